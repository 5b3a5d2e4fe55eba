"""What a merge method is, as data: `MethodSpec` (its function, inputs, typed parameters with defaults and ranges,
the names peers give it, and the traits the planner and engine rely on) and `ParamSpec`.

Traits, each one a promise that `tests/test_methods_spec.py` checks against the function:
- `elementwise`: output element i depends only on the inputs' element i, so the engine may compute it chunk by
  chunk (bit-identical to the whole-tensor call);
- `linear`: the coefficients c(params) with fn(x_0, ..., x_n) = sum_i c_i x_i (up to rounding), so the engine may
  fuse nested linear steps into one sum;
- `identities`: parameter values at which fn returns a bit-exact copy of one input, so the planner copies that
  input instead of calling the method.

Torch-free: `fn` is imported on first call, so recipes are validated without torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

from mergekit_sdxl.errors import RecipeError

if TYPE_CHECKING:
    from torch import Tensor

Scalar = Union[float, int, bool, str]
Coefficients = Callable[[Mapping[str, float]], tuple[float, ...]]


class LazyFunction:
    """A function `mergekit_sdxl.methods.<module>.<attr>`, imported on first call."""

    def __init__(self, target: str) -> None:
        self.module, self.attr = target.split(".")
        self._fn: Callable[..., Any] | None = None

    def resolve(self) -> Callable[..., Any]:
        if self._fn is None:
            self._fn = getattr(importlib.import_module(f"mergekit_sdxl.methods.{self.module}"), self.attr)
        return self._fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<merge method {self.module}.{self.attr}>"


@dataclass(frozen=True)
class ParamSpec:
    """One keyword parameter: type (float, int or bool), default (None: required), inclusive range, meaning."""

    name: str
    type: type = float
    default: Scalar | None = None
    low: float | None = None
    high: float | None = None
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is None

    def check(self, method: str, value: object) -> Scalar:
        """`value` as this parameter's type; RecipeError for a wrong type or a value outside the range."""
        if not _accepts(self.type, value):
            raise RecipeError(f"Method {method!r}: parameter {self.name!r} must be {self.type.__name__}, got "
                              f"{value!r} ({type(value).__name__}).")
        if self.type is bool:
            return bool(value)
        assert isinstance(value, (int, float))  # _accepts let through only the numbers of a numeric type
        number = float(value) if self.type is float else int(value)
        if (self.low is not None and number < self.low) or (self.high is not None and number > self.high):
            raise RecipeError(f"Method {method!r}: parameter {self.name!r} must lie in {self.range_text()}, "
                              f"got {value!r}.")
        return number

    def range_text(self) -> str:
        """"[0, 1]", "[0, inf)", "any" ..."""
        if self.low is None and self.high is None:
            return "any"
        low = "(-inf" if self.low is None else f"[{self.low:g}"
        high = "inf)" if self.high is None else f"{self.high:g}]"
        return f"{low}, {high}"


def _accepts(want: type, value: object) -> bool:
    if want is bool or isinstance(value, bool):
        return want is bool and isinstance(value, bool)
    if want is float:
        return isinstance(value, (int, float))
    return isinstance(value, want)


@dataclass(frozen=True)
class Identity:
    """When every (parameter, value) of `when` holds, the method returns a bit-exact copy of input `input`."""

    input: int
    when: tuple[tuple[str, float], ...] = ()

    def matches(self, params: Mapping[str, object]) -> bool:
        return all(_is_real(params.get(name)) and params[name] == value for name, value in self.when)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True, eq=False)
class MethodSpec:
    """A registered merge method.

    Attributes:
        name: the name recipes use.
        fn: the pure function, called as fn(*tensors, **params).
        inputs: names of the fixed tensor inputs, in call order.
        params: keyword parameters, in signature order.
        doc: what the method does, in one line.
        formula: the result as a formula of the inputs and parameters (plain text, one line; the method
            reference, `mergekit-sdxl methods` and docs/methods.md, prints it).
        variadic: further tensors follow `inputs` (at least `min_variadic` of them).
        elementwise, linear, identities: traits (module docstring).
        peers: tool -> the name that tool gives this method ("supermerger": "Weight sum", ...).
        alias_of: the method this one is another name for.
    """

    name: str
    fn: Callable[..., Tensor]
    inputs: tuple[str, ...]
    params: tuple[ParamSpec, ...] = ()
    doc: str = ""
    variadic: bool = False
    min_variadic: int = 1
    elementwise: bool = False
    linear: Coefficients | None = None
    identities: tuple[Identity, ...] = ()
    peers: Mapping[str, str] = field(default_factory=dict)
    alias_of: str | None = None
    formula: str = ""

    def param(self, name: str) -> ParamSpec:
        """The spec of parameter `name`; KeyError if the method has none."""
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    @property
    def defaults(self) -> dict[str, Scalar]:
        """Parameter -> default, for the parameters that have one."""
        return {p.name: p.default for p in self.params if p.default is not None}

    @property
    def seeded(self) -> bool:
        """Whether the method draws random numbers (it then takes an integer `seed` the planner derives per key)."""
        return "seed" in self.param_names

    @property
    def min_inputs(self) -> int:
        return len(self.inputs) + (self.min_variadic if self.variadic else 0)

    def arity(self) -> str:
        """The accepted number of input tensors, in words."""
        return f"at least {self.min_inputs}" if self.variadic else f"exactly {len(self.inputs)}"

    def coefficients(self, params: Mapping[str, object]) -> tuple[float, ...] | None:
        """sum_i c_i x_i coefficients at `params` (defaults filled in), or None when the method is not linear or a
        parameter is not a plain number."""
        if self.linear is None:
            return None
        values = {**self.defaults, **params}
        numbers = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and _is_real(v)}
        if not all(p.name in numbers for p in self.params):
            return None
        return tuple(float(c) for c in self.linear(numbers))

    def identity_input(self, params: Mapping[str, object]) -> int | None:
        """The index of the input the result equals bit for bit at `params`, or None."""
        values = {**self.defaults, **params}
        return next((i.input for i in self.identities if i.matches(values)), None)
