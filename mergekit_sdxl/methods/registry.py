"""The merge-method registry: one `MethodSpec` per method (see `methods/spec.py`), and the checked call.

The recipe layer validates steps against `METHODS` (names, input counts, parameter names, types and ranges)
before any tensor is read; the planner asks a spec for its identity points, the engine for its traits
(elementwise, linear coefficients); the engine runs `call_method` per key. Torch-free: each `fn` imports its
module on first call. Adding a method: its function next to this module, one `MethodSpec` row below, tests;
`tests/test_methods_spec.py` checks every row against its function (signature, coefficients, identities,
elementwise).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from mergekit_sdxl.errors import MergekitError, RecipeError
from mergekit_sdxl.methods.spec import Identity, LazyFunction, MethodSpec, ParamSpec, Scalar

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["METHODS", "MethodSpec", "NonFiniteError", "ParamSpec", "Scalar", "call_method", "check_finite",
           "check_inputs", "check_params", "get_method"]


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


def _alpha(doc: str = "weight of the second model (0 gives A, 1 gives B)") -> ParamSpec:
    return ParamSpec("alpha", float, None, doc=doc)


_BETA = ParamSpec("beta", float, None, doc="weight of the third model")

METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec(
        "copy", LazyFunction("interpolate.copy"), ("a",), doc="Keep A unchanged.",
        elementwise=True, linear=lambda p: (1.0,), identities=(Identity(0),), peers={"mergekit": "passthrough"},
        formula="A"),
    MethodSpec(
        "keep", LazyFunction("interpolate.copy"), ("a",), doc="Keep A unchanged.",
        elementwise=True, linear=lambda p: (1.0,), identities=(Identity(0),), alias_of="copy",
        peers={"mergekit": "passthrough"}, formula="A"),
    MethodSpec(
        "weighted_sum", LazyFunction("interpolate.weighted_sum"), ("a", "b"), (_alpha(),),
        "Weighted sum; alpha is the weight of B (A1111 and SuperMerger direction).", elementwise=True,
        linear=lambda p: (1.0 - p["alpha"], p["alpha"]),
        identities=(Identity(0, (("alpha", 0.0),)), Identity(1, (("alpha", 1.0),))),
        peers={"a1111": "Weighted sum", "supermerger": "Weight sum", "sd-mecha": "weighted_sum",
               "mergekit": "linear"}, formula="(1 - alpha)·A + alpha·B"),
    MethodSpec(
        "add_difference", LazyFunction("interpolate.add_difference"), ("a", "b", "c"),
        (_alpha("weight of the difference B - C"),), "Add the difference B - C to A.", elementwise=True,
        linear=lambda p: (1.0, p["alpha"], -p["alpha"]), identities=(Identity(0, (("alpha", 0.0),)),),
        peers={"a1111": "Add difference", "supermerger": "Add difference", "sd-mecha": "add_difference"},
        formula="A + alpha·(B - C)"),
    MethodSpec(
        "add_rounded_difference", LazyFunction("interpolate.add_rounded_difference"), ("a", "b", "c"),
        (_alpha("weight of the difference B - C"),
         ParamSpec("bf16", bool, False, doc="round B - C to bf16 instead of fp16")),
        "Add difference with B - C rounded to fp16 first (SuperMerger's Add difference, 2023-07 to 2025-11).",
        elementwise=True, identities=(Identity(0, (("alpha", 0.0),)),),
        peers={"supermerger": "Add difference (2023-07 to 2025-11)"},
        formula="A + alpha·round(B - C), round: to fp16 (bf16 when bf16 is true), then back to the compute dtype"),
    MethodSpec(
        "triple_sum", LazyFunction("interpolate.triple_sum"), ("a", "b", "c"), (_alpha(), _BETA),
        "Three-model weighted sum.", elementwise=True,
        linear=lambda p: (1.0 - p["alpha"] - p["beta"], p["alpha"], p["beta"]),
        peers={"supermerger": "Triple sum"}, formula="(1 - alpha - beta)·A + alpha·B + beta·C"),
    MethodSpec(
        "sum_twice", LazyFunction("interpolate.sum_twice"), ("a", "b", "c"), (_alpha(), _BETA),
        "Two weighted sums in a row: A with B, then the result with C.", elementwise=True,
        linear=lambda p: ((1.0 - p["beta"]) * (1.0 - p["alpha"]), (1.0 - p["beta"]) * p["alpha"], p["beta"]),
        identities=(Identity(2, (("beta", 1.0),)), Identity(0, (("alpha", 0.0), ("beta", 0.0))),
                    Identity(1, (("alpha", 1.0), ("beta", 0.0)))),
        peers={"supermerger": "sum Twice"}, formula="(1 - beta)·((1 - alpha)·A + alpha·B) + beta·C"),
    MethodSpec(
        "train_difference", LazyFunction("interpolate.train_difference"), ("a", "b", "c"),
        (_alpha("weight of the scaled difference"),),
        "SuperMerger's trainDifference: add difference, scaled per element by how far A still is from B.",
        elementwise=True, identities=(Identity(0, (("alpha", 0.0),)),),
        peers={"supermerger": "trainDifference"},
        formula="A + 1.8·alpha·s·(B - C), s = |B - A| / (|B - A| + |B - C|) per element (0 where both are 0)"),
    MethodSpec(
        "slerp", LazyFunction("interpolate.slerp"), ("a", "b"), (_alpha(),),
        "Spherical interpolation from A (alpha=0) to B (alpha=1).",
        identities=(Identity(0, (("alpha", 0.0),)), Identity(1, (("alpha", 1.0),))),
        peers={"sd-mecha": "slerp", "mergekit": "slerp"},
        formula="sin((1 - alpha)·θ)/sin θ·A + sin(alpha·θ)/sin θ·B, cos θ = <A, B>/(|A|·|B|) over the whole "
                "tensor; (1 - alpha)·A + alpha·B when |cos θ| > 0.9995 or A or B is all zeros"),
    MethodSpec(
        "ties", LazyFunction("task_vectors.ties"), ("base",),
        (ParamSpec("alpha", float, 1.0, doc="weight of the merged delta"),
         ParamSpec("density", float, 0.2, 0.0, 1.0, "fraction of each delta's entries kept (largest |x|)")),
        "TIES: trim deltas to top density, elect sign by mass, disjoint mean; base + alpha·merged.",
        variadic=True, peers={"sd-mecha": "ties_sum", "mergekit": "ties"},
        formula="base + alpha·(sum of the t_i whose sign is e) / (their count), t_i = M_i - base trimmed to its "
                "round(density·n) largest |values|, e = sign(sum_i t_i) per element (no sign elected at 0)"),
    MethodSpec(
        "dare", LazyFunction("task_vectors.dare"), ("base",),
        (ParamSpec("seed", int, None, doc="seeds the drop masks (the planner derives one per key)"),
         ParamSpec("p", float, 0.9, 0.0, 1.0, "drop probability"),
         ParamSpec("alpha", float, 1.0, doc="weight of the summed deltas"),
         ParamSpec("ties_sign", bool, False, doc="sum only entries agreeing with the elected sign (dare_ties)")),
        "DARE: drop delta entries with probability p, rescale by 1/(1 - p), sum; base + alpha·sum.",
        variadic=True, peers={"mergekit": "dare_linear (dare_ties: ties_sign true)"},
        formula="base + alpha·sum_i m_i·(M_i - base)/(1 - p), m_i: keep masks, each entry kept with probability "
                "1 - p, drawn from seed; ties_sign: only the entries whose sign agrees with the elected one"),
    MethodSpec(
        "model_stock", LazyFunction("task_vectors.model_stock"), ("base",), (),
        "Model Stock: t·avg(models) + (1 - t)·base, t from the mean pairwise delta cosine.",
        variadic=True, min_variadic=2, peers={"sd-mecha": "model_stock", "mergekit": "model_stock"},
        formula="base + t·mean_i(M_i - base), t = k·c / ((k - 1)·c + 1), k models, c = mean pairwise cosine of "
                "the deltas clamped to [0, 1]"),
)}


def get_method(name: str) -> MethodSpec:
    """The spec registered as `name`; RecipeError listing the known names (and a close match) otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        pass
    close = difflib.get_close_matches(str(name), METHODS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise RecipeError(f"Unknown merge method {name!r}.{hint} Known methods: {', '.join(sorted(METHODS))}.")


def check_params(spec: MethodSpec, params: Mapping[str, object]) -> dict[str, Scalar]:
    """Validate `params` against `spec` and return them with defaults filled in (RecipeError otherwise)."""
    unknown = [k for k in params if k not in spec.param_names]
    if unknown:
        known = ", ".join(spec.param_names) or "none"
        raise RecipeError(f"Method {spec.name!r} has no parameter {unknown[0]!r} (its parameters: {known}).")
    missing = [p.name for p in spec.params if p.required and p.name not in params]
    if missing:
        raise RecipeError(f"Method {spec.name!r}: parameter {missing[0]!r} is required.")
    merged = spec.defaults
    merged.update({k: spec.param(k).check(spec.name, v) for k, v in params.items()})
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
