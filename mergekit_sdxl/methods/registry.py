"""The merge-method registry: names -> pure functions with their inputs and parameters.

The recipe layer validates steps against `METHODS` (names, input counts, parameter names and types) before
any tensor is read; the engine runs `call_method` per key. This module does not import torch: each spec's
`fn` imports its module on first call, so recipes can be checked without paying torch's import time.
Adding a method: write the function in a module next to this one and add one `_register(...)` entry below
(tests check every entry against the function's real signature).
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Union

from mergekit_sdxl.errors import MergekitError, RecipeError

if TYPE_CHECKING:
    from torch import Tensor

Scalar = Union[float, int, bool, str]


class NonFiniteError(MergekitError):
    """A merge produced NaN or inf values; the message names where (step, key)."""

    exit_code = 4


def check_finite(t: Tensor, where: str) -> Tensor:
    """Return `t` unchanged, or raise NonFiniteError naming `where` when it holds NaN or inf."""
    finite = t.isfinite()
    if bool(finite.all()):
        return t
    bad = int(finite.numel() - finite.sum())
    raise NonFiniteError(
        f"{where}: the result has {bad} non-finite value(s) (NaN/inf) out of {t.numel()}. "
        "Check the inputs for NaN/inf, use smaller coefficients, or compute in fp64."
    )


class _LazyFunction:
    """A function `mergekit_sdxl.methods.<module>.<attr>` imported on first call."""

    def __init__(self, module: str, attr: str) -> None:
        self.module, self.attr = module, attr
        self._fn: Callable[..., Any] | None = None

    def resolve(self) -> Callable[..., Any]:
        if self._fn is None:
            self._fn = getattr(importlib.import_module(f"mergekit_sdxl.methods.{self.module}"), self.attr)
        return self._fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<merge method {self.module}.{self.attr}>"


@dataclass(frozen=True, eq=False)
class MethodSpec:
    """A registered merge method.

    Attributes:
        name: the name recipes use.
        fn: the pure function, called as fn(*tensors, **params).
        inputs: names of the fixed tensor inputs, in call order.
        variadic: when True, further tensors follow `inputs` (at least `min_variadic` of them).
        params: keyword parameters -> default value; None marks a required parameter.
        doc: one-line description.
        param_types: keyword parameter -> float, int or bool (bool is never accepted for int/float; int is
            accepted for float).
        min_variadic: the least number of variadic tensors (ignored unless `variadic`).
    """

    name: str
    fn: Callable[..., Tensor]
    inputs: tuple[str, ...]
    variadic: bool
    params: Mapping[str, Scalar | None]
    doc: str
    param_types: Mapping[str, type] = field(default_factory=lambda: MappingProxyType({}))
    min_variadic: int = 1

    @property
    def min_inputs(self) -> int:
        return len(self.inputs) + (self.min_variadic if self.variadic else 0)

    def arity(self) -> str:
        """The accepted number of input tensors, in words."""
        return f"at least {self.min_inputs}" if self.variadic else f"exactly {len(self.inputs)}"


METHODS: dict[str, MethodSpec] = {}


def _register(
    name: str,
    target: str,
    inputs: tuple[str, ...],
    doc: str,
    params: Mapping[str, tuple[type, Scalar | None]] = MappingProxyType({}),
    variadic: bool = False,
    min_variadic: int = 1,
) -> None:
    """Add a spec; `target` is "module.function", `params` maps name -> (type, default or None if required)."""
    module, attr = target.split(".")
    defaults = MappingProxyType({k: default for k, (_, default) in params.items()})
    types = MappingProxyType({k: kind for k, (kind, _) in params.items()})
    fn = _LazyFunction(module, attr)
    METHODS[name] = MethodSpec(name, fn, inputs, variadic, defaults, doc, types, min_variadic)


_ALPHA = {"alpha": (float, None)}
_ALPHA_BETA = {"alpha": (float, None), "beta": (float, None)}
_register("copy", "interpolate.copy", ("a",), "Keep A unchanged.")
_register("keep", "interpolate.copy", ("a",), "Keep A unchanged (alias of copy).")
_register("weighted_sum", "interpolate.weighted_sum", ("a", "b"), "(1 - alpha)·A + alpha·B.", _ALPHA)
_register("add_difference", "interpolate.add_difference", ("a", "b", "c"), "A + alpha·(B - C).", _ALPHA)
_register(
    "triple_sum", "interpolate.triple_sum", ("a", "b", "c"), "(1 - alpha - beta)·A + alpha·B + beta·C.", _ALPHA_BETA
)
_register(
    "sum_twice", "interpolate.sum_twice", ("a", "b", "c"), "(1 - beta)·((1 - alpha)·A + alpha·B) + beta·C.", _ALPHA_BETA
)
_register(
    "train_difference",
    "interpolate.train_difference",
    ("a", "b", "c"),
    "SuperMerger trainDifference: A + 1.8·alpha·(B - C)·|B - A| / (|B - A| + |B - C|).",
    _ALPHA,
)
_register("slerp", "interpolate.slerp", ("a", "b"), "Spherical interpolation from A (alpha=0) to B (alpha=1).", _ALPHA)
_register(
    "ties",
    "task_vectors.ties",
    ("base",),
    "TIES: trim deltas to top density, elect sign by mass, disjoint mean; base + alpha·merged.",
    {"alpha": (float, 1.0), "density": (float, 0.2)},
    variadic=True,
)
_register(
    "dare",
    "task_vectors.dare",
    ("base",),
    "DARE: drop delta entries with probability p, rescale by 1/(1 - p), sum; base + alpha·sum.",
    {"seed": (int, None), "p": (float, 0.9), "alpha": (float, 1.0), "ties_sign": (bool, False)},
    variadic=True,
)
_register(
    "model_stock",
    "task_vectors.model_stock",
    ("base",),
    "Model Stock: t·avg(models) + (1 - t)·base, t from the mean pairwise delta cosine.",
    variadic=True,
    min_variadic=2,
)


def get_method(name: str) -> MethodSpec:
    """The spec registered as `name`; RecipeError listing the known names (and a close match) otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        pass
    close = difflib.get_close_matches(str(name), METHODS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise RecipeError(f"Unknown merge method {name!r}.{hint} Known methods: {', '.join(sorted(METHODS))}.")


def _accepts(want: type, value: object) -> bool:
    if want is bool or isinstance(value, bool):
        return want is bool and isinstance(value, bool)
    if want is float:
        return isinstance(value, (int, float))
    return isinstance(value, want)


def _check_value(spec: MethodSpec, key: str, value: object) -> Scalar:
    want = spec.param_types[key]
    if not _accepts(want, value):
        raise RecipeError(
            f"Method {spec.name!r}: parameter {key!r} must be {want.__name__}, got {value!r} ({type(value).__name__})."
        )
    return float(value) if want is float else value


def check_params(spec: MethodSpec, params: Mapping[str, object]) -> dict[str, Scalar]:
    """Validate `params` against `spec` and return them with defaults filled in (RecipeError otherwise)."""
    unknown = [k for k in params if k not in spec.params]
    if unknown:
        known = ", ".join(spec.params) or "none"
        raise RecipeError(f"Method {spec.name!r} has no parameter {unknown[0]!r} (its parameters: {known}).")
    missing = [k for k, default in spec.params.items() if default is None and k not in params]
    if missing:
        raise RecipeError(f"Method {spec.name!r}: parameter {missing[0]!r} is required.")
    merged = {k: v for k, v in spec.params.items() if v is not None}
    merged.update({k: _check_value(spec, k, v) for k, v in params.items()})
    return merged


def check_inputs(spec: MethodSpec, count: int) -> None:
    """RecipeError unless `count` input tensors suit `spec`."""
    ok = count >= spec.min_inputs if spec.variadic else count == len(spec.inputs)
    if not ok:
        names = ", ".join(spec.inputs) + (", models..." if spec.variadic else "")
        raise RecipeError(f"Method {spec.name!r} takes {spec.arity()} input model(s) ({names}), got {count}.")


def call_method(name: str, tensors: Sequence[Tensor], params: Mapping[str, object]) -> Tensor:
    """Run method `name` on `tensors` with `params` after checking input count and parameter names/types.

    Raises:
        RecipeError: unknown method, wrong number of inputs, unknown/missing/mistyped parameter, or a parameter
            value the method rejects (e.g. density outside [0, 1]); the message names the method.
    """
    spec = get_method(name)
    check_inputs(spec, len(tensors))
    kwargs = check_params(spec, params)
    try:
        return spec.fn(*tensors, **kwargs)
    except ValueError as exc:
        raise RecipeError(f"Method {name!r}: {exc}") from exc
