"""Task-arithmetic formulas as model cards write them: `beta7 + 1.0 * (anxl3 - anxl2) + 0.25 * (base8 - beta7)`.

Grammar (a hand-written tokenizer and recursive-descent parser; nothing is ever evaluated as Python):

    sum     := product (("+" | "-") product)*
    product := unary ("*" unary)*
    unary   := ("-" | "+") unary | atom
    atom    := NUMBER | NAME | "(" sum ")"

Typing follows the affine structure of weights: every name stands for a model's weights (or, for an earlier
step that is a pure delta, for a delta). The *mass* of an expression is the sum of the coefficients of its
weight terms. Each sum (the whole formula and each parenthesised group) must have mass 1 (a weight: `a + (b - c)`,
`0.5 * a + 0.5 * b`) or 0 (a delta: `b - c`). So `model + model` and `model * 2` are refused, naming the term,
before any tensor is read; a product of two models is refused too.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NoReturn

from mergekit_sdxl.errors import RecipeError

Kind = Literal["weight", "delta"]

MAX_FORMULA_CHARS = 10_000
MAX_DEPTH = 64
_TOLERANCE = 1e-9
ZERO_COEFF = 1e-12
NAME_PATTERN = r"[A-Za-z_][A-Za-z0-9_]*"

_TOKEN = re.compile(
    rf"(?P<space>\s+)|(?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)|(?P<name>{NAME_PATTERN})|(?P<op>[-+*()])"
)


@dataclass(frozen=True)
class Token:
    kind: str  # "number", "name", "op" or "end"
    text: str
    pos: int


@dataclass(frozen=True)
class Formula:
    """A parsed formula: its text, its kind, and the collected coefficient of each name (first-seen order)."""

    text: str
    kind: Kind
    coeffs: tuple[tuple[str, float], ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.coeffs)


@dataclass
class _Value:
    """An intermediate value: a constant (a number) or a linear map name -> coefficient with its weight mass."""

    coeffs: dict[str, float]
    const: float = 0.0
    mass: float = 0.0

    @property
    def is_scalar(self) -> bool:
        return not self.coeffs


def tokenize(text: str) -> list[Token]:
    """Split `text` into tokens; RecipeError naming the position of any character outside the grammar."""
    if len(text) > MAX_FORMULA_CHARS:
        raise RecipeError(f"formula is {len(text)} characters long; the limit is {MAX_FORMULA_CHARS}")
    tokens: list[Token] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise RecipeError(
                f"formula {text!r}: unexpected {text[pos]!r} at position {pos + 1}; "
                "only + - * ( ), numbers and model/step names are allowed"
            )
        if match.lastgroup != "space":
            tokens.append(Token(match.lastgroup or "", match.group(), pos))
        pos = match.end()
    tokens.append(Token("end", "", len(text)))
    return tokens


def parse_formula(text: str, kinds: dict[str, Kind]) -> Formula:
    """Parse and type-check `text`; `kinds` maps every usable name to "weight" or "delta".

    Returns the formula with like terms collected and zero coefficients dropped. Raises RecipeError naming the
    offending term for syntax errors, unknown names and ill-typed terms (`a + b`, `a * 2`, `a * b`, `a + 1`).
    """
    if not isinstance(text, str) or not text.strip():
        raise RecipeError("formula is empty")
    parser = _Parser(text, tokenize(text), kinds)
    value = parser.parse()
    kind: Kind = "weight" if math.isclose(value.mass, 1.0, abs_tol=_TOLERANCE) else "delta"
    coeffs = tuple((name, c) for name, c in value.coeffs.items() if abs(c) > ZERO_COEFF)
    if not coeffs:
        raise RecipeError(f"formula {text!r}: every term cancels out; the result would be all zeros")
    return Formula(text.strip(), kind, coeffs)


class _Parser:
    def __init__(self, text: str, tokens: list[Token], kinds: dict[str, Kind]) -> None:
        self.text, self.tokens, self.kinds = text, tokens, kinds
        self.index = 0
        self.depth = 0

    @property
    def current(self) -> Token:
        return self.tokens[self.index]

    def parse(self) -> _Value:
        value, terms = self.terms()
        if self.current.kind != "end":
            self.fail(f"unexpected {self.current.text!r} at position {self.current.pos + 1}")
        self.check_sum(value, " ".join(self.text.split()), terms, top=True)
        return value

    def fail(self, message: str) -> NoReturn:
        raise RecipeError(f"formula {self.text!r}: {message}")

    def snippet(self, start: int) -> str:
        end = self.tokens[self.index - 1].pos + len(self.tokens[self.index - 1].text) if self.index else start
        # whitespace collapsed: a formula written over several YAML lines must still give a one-line message
        return " ".join(self.text[start:end].split())

    def sum_(self) -> _Value:
        start = self.current.pos
        value, terms = self.terms()
        self.check_sum(value, self.snippet(start), terms, top=False)
        return value

    def terms(self) -> tuple[_Value, int]:
        """A sum of products, unchecked, and how many products it has."""
        start = self.current.pos
        value = self.product()
        terms = 1
        while self.current.text in ("+", "-"):
            op = self.advance().text
            right = self.product()
            value = self.combine(value, right, -1.0 if op == "-" else 1.0, start)
            terms += 1
        return value, terms

    def combine(self, left: _Value, right: _Value, sign: float, start: int) -> _Value:
        if left.is_scalar != right.is_scalar:
            model_side = self.snippet(start)
            self.fail(f"`{model_side}` adds a number to a model; numbers can only multiply a term")
        coeffs = dict(left.coeffs)
        for name, c in right.coeffs.items():
            coeffs[name] = self.finite(coeffs.get(name, 0.0) + sign * c, self.snippet(start))
        return _Value(coeffs, left.const + sign * right.const, left.mass + sign * right.mass)

    def check_sum(self, value: _Value, text: str, terms: int, top: bool) -> None:
        """A sum must be a weight (mass 1) or a delta (mass 0); the whole formula must involve a model."""
        if value.is_scalar:
            if top:
                self.fail("has no model or step name; a formula must produce weights or a delta")
            return
        if math.isclose(value.mass, 1.0, abs_tol=_TOLERANCE) or math.isclose(value.mass, 0.0, abs_tol=_TOLERANCE):
            return
        mass = f"{value.mass:.6g}"
        if terms > 1 and value.mass > 1:
            self.fail(
                f"`{text}` adds models (model weights add up to {mass}); write a difference such as "
                "`a - b` (a delta) or a weighted sum such as `0.5 * a + 0.5 * b`"
            )
        self.fail(
            f"`{text}` scales a model (model weights add up to {mass}, not 1 for a model or 0 for a delta); "
            "only deltas such as `0.5 * (a - b)` can be scaled"
        )

    def product(self) -> _Value:
        start = self.current.pos
        value = self.unary()
        while self.current.text == "*":
            self.advance()
            right = self.unary()
            if not value.is_scalar and not right.is_scalar:
                self.fail(f"`{self.snippet(start)}` multiplies two models; one side of `*` must be a number")
            value = self.multiply(value, right, start)
        return value

    def multiply(self, left: _Value, right: _Value, start: int) -> _Value:
        if left.is_scalar and right.is_scalar:
            return _Value({}, self.finite(left.const * right.const, self.snippet(start)))
        scalar, model = (left, right) if left.is_scalar else (right, left)
        coeffs = {name: self.finite(c * scalar.const, self.snippet(start)) for name, c in model.coeffs.items()}
        return _Value(coeffs, 0.0, model.mass * scalar.const)

    def unary(self) -> _Value:
        token = self.current
        if token.text in ("-", "+"):
            self.advance()
            value = self.nested(self.unary)
            if token.text == "+":
                return value
            negated = {name: -c for name, c in value.coeffs.items()}
            return _Value(negated, -value.const, -value.mass)
        return self.atom()

    def nested(self, rule: Callable[[], _Value]) -> _Value:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            self.fail(f"nests deeper than {MAX_DEPTH} levels")
        try:
            return rule()
        finally:
            self.depth -= 1

    def atom(self) -> _Value:
        token = self.advance()
        if token.kind == "number":
            return _Value({}, self.finite(float(token.text), token.text))
        if token.kind == "name":
            return self.name(token)
        if token.text == "(":
            value = self.nested(self.sum_)
            if self.current.text != ")":
                self.fail(f"missing `)` for the `(` at position {token.pos + 1}")
            self.advance()
            return value
        what = "end of formula" if token.kind == "end" else repr(token.text)
        self.fail(f"expected a number, a name or `(` at position {token.pos + 1}, got {what}")

    def name(self, token: Token) -> _Value:
        kind = self.kinds.get(token.text)
        if kind is None:
            known = ", ".join(sorted(self.kinds)) or "none"
            self.fail(f"unknown name `{token.text}` (models and earlier steps: {known})")
        return _Value({token.text: 1.0}, 0.0, 1.0 if kind == "weight" else 0.0)

    def finite(self, number: float, text: str) -> float:
        if not math.isfinite(number):
            self.fail(f"`{text}` is not a finite number")
        return number

    def advance(self) -> Token:
        token = self.tokens[self.index]
        if token.kind != "end":
            self.index += 1
        return token
