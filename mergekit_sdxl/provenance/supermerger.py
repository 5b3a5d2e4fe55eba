"""Recipes from SuperMerger (`sd_merge_recipe` with `"type": "sd-webui-supermerger"`).

What SuperMerger (hako-mikan/sd-webui-supermerger, `scripts/mergers/mergers.py`, `smerge`) records and does,
re-derived from its public code (the recipe layout is the same from 2023-04 to today):
- fields: `mode` ("Weight sum", "Add difference", "Triple sum", "sum Twice"; older files "Weight sum:A*(1-alpha)+
  B*alpha", ...: SuperMerger itself tests substrings), `calcmode` ("normal", "trainDifference", "cosineA", ...),
  `mbw` (bool), `base_alpha` / `base_beta` (numbers; BASE's weight), `weights_alpha` / `weights_beta` (the
  block weights after BASE as a list: 25 for SD1, 20 for SDXL with an unused VAE slot last; null without MBW),
  `weights_alpha_orig` (the text the user gave), `model_a` / `model_b` / `model_c` (full sha256),
  `elemental_merge`, and the include/exclude setting under its own name ("Off", "Include", "Exclude");
- which keys merge and with which block weight: the block rule of `arch.blocks` (convention `supermerger` since
  2025-11-27, `supermerger-2023` before); keys the rule leaves out keep A, with or without MBW;
- arithmetic (calcmode normal), by version: until 2023-11-09 every mode in the tensors' own dtype (fp16 inputs:
  fp16 arithmetic, one rounding per operation); from 2023-11-10 Weight sum, Triple sum and sum Twice as fp32
  `torch.lerp` rounded back to A's dtype; Add difference in the tensors' dtype until 2025-01-19, from 2025-01-20
  to 2025-11-26 with B - C rounded to B's dtype and the rest in fp32 (`add_rounded_difference`), and from
  2025-11-27 in the tensors' dtype again; trainDifference in fp32.
"""

from __future__ import annotations

from typing import Any

from mergekit_sdxl.arch.registry import ARCH_NAMES, arch_spec
from mergekit_sdxl.errors import CheckpointError
from mergekit_sdxl.provenance.published import (
    DTYPE_NAMES,
    Assumptions,
    Fields,
    InputRef,
    PublishedFile,
    Reconstruction,
    recorded_name,
    sd_merge_models,
)
from mergekit_sdxl.provenance.recipe_text import Flow, Noted

TYPE = "sd-webui-supermerger"
TOOL = "SuperMerger"
RULE_CHANGE = "2025-11-27"  # SuperMerger commit 2cbd062: SDXL time_embed/label_emb -> IN00, fp16 add difference
LERP_SINCE = "2023-11-10"  # ef63fce: weight sum, triple sum, sum twice as fp32 torch.lerp
ROUNDED_DELTA_SINCE = "2025-01-20"  # 54e0ddc: add difference in fp32 with B - C kept in B's dtype
SUPPORTED_CALCMODES = ("normal", "trainDifference")
KNOWN_CALCMODES = ("normal", "cosineA", "cosineB", "trainDifference", "smoothAdd", "smoothAdd MT", "extract",
                   "tensor", "tensor2", "self", "plus random")
_INEX = ("Include", "Exclude")


def _mode(mode: str, calcmode: str) -> tuple[str, str, int]:
    """(our method, SuperMerger's mode name, number of models) for a mode text, tested as SuperMerger does."""
    if calcmode == "trainDifference":
        return "train_difference", "Add difference (trainDifference)", 3
    if "Add" in mode:
        return "add_difference", "Add difference", 3
    if "Triple" in mode:
        return "triple_sum", "Triple sum", 3
    if "Twice" in mode:
        return "sum_twice", "sum Twice", 3
    return "weighted_sum", "Weight sum", 2


def reconstruct(recipe: Any, pub: PublishedFile, assume: Assumptions) -> Reconstruction:
    """The recipe that redoes the SuperMerger merge recorded in `recipe` (the parsed `sd_merge_recipe`)."""
    f = Fields(recipe, pub.where("sd_merge_recipe"))
    calcmode = f.get("calcmode", (str,), "normal") or "normal"
    if calcmode not in SUPPORTED_CALCMODES:
        known = "" if calcmode in KNOWN_CALCMODES else " (unknown to this version)"
        raise CheckpointError(f"{f.where}.calcmode: SuperMerger's {calcmode!r}{known} has no formula here; "
                              f"reproducible calcmodes: {', '.join(SUPPORTED_CALCMODES)}")
    _unsupported_options(f)
    method, mode_name, n_models = _mode(f.get("mode", (str,)), calcmode)
    if pub.arch is None:
        raise CheckpointError(f"{pub.name}: not an {' or '.join(ARCH_NAMES.values())} checkpoint; cannot map "
                              "SuperMerger's blocks")
    date = assume.date or pub.date()
    convention = "supermerger" if date is None or date >= RULE_CHANGE else "supermerger-2023"
    lineage = sd_merge_models(pub)
    inputs = []
    for alias, role in (("model_a", "model A"), ("model_b", "model B"), ("model_c", "model C"))[:n_models]:
        sha = f.sha256(alias)
        name, legacy = recorded_name(lineage, sha)
        inputs.append(InputRef(alias, role, sha, None, name, legacy))
    storage = _storage(pub, [ref.sha256 for ref in inputs], assume)
    method, in_storage = _arithmetic(method, date)
    step: dict[str, Any] = {"method": method, **{ref.alias[-1]: ref.alias for ref in inputs}}
    if method == "add_rounded_difference" and storage == "BF16":
        step["bf16"] = True
    mbw = f.get("mbw", (bool, str), False) in (True, "True")
    step["alpha"] = _weights(f, "alpha", mbw, pub.arch)
    if method in ("triple_sum", "sum_twice"):
        step["beta"] = _weights(f, "beta", mbw, pub.arch)
    data: dict[str, Any] = {"version": 1, "name": pub.path.stem,
                            "arch": Noted(pub.arch, "from the published file's keys"),
                            "convention": Noted(convention, _convention_note(date, assume.date))}
    data["models"] = {ref.alias: _model(ref) for ref in inputs}
    data["steps"] = {"merged": Noted(step, f'SuperMerger "{mode_name}" (sd_merge_recipe.mode / calcmode); alpha '
                                           "is the weight of B, as in SuperMerger")}
    data["output"] = _output(pub, method, in_storage, storage)
    header = [f"Reconstructed by `mergekit-sdxl recipe-from` from {pub.name}: sd_merge_recipe written by {TOOL} "
              f'(mode "{mode_name}", calcmode "{calcmode}", MBW {"on" if mbw else "off"}).']
    warnings = [] if date else [f"{pub.name}: SuperMerger does not record when it merged; assumed a version since "
                                f"{RULE_CHANGE} (block rule `supermerger`). For a file made earlier, run recipe-from "
                                "with --date YYYY-MM-DD (or set convention: supermerger-2023)"]
    return Reconstruction(TOOL, data, header, inputs, warnings)


def _unsupported_options(f: Fields) -> None:
    deep = f.get("elemental_merge", (str, list, type(None)), "")
    if isinstance(deep, list) and any(isinstance(d, str) and d.strip() for d in deep) or \
            isinstance(deep, str) and deep.strip():
        raise CheckpointError(f"{f.where}.elemental_merge: SuperMerger's elemental merge (per-element weights "
                              f"{str(deep)[:80]!r}) is not reproducible here yet")
    for key in _INEX:
        chosen = f.get(key, (list, str, type(None)), None)
        if chosen and any(isinstance(c, str) and c.strip() for c in (chosen if isinstance(chosen, list) else [chosen])):
            raise CheckpointError(f"{f.where}.{key}: SuperMerger's include/exclude of blocks or elements "
                                  f"({str(chosen)[:80]}) is not reproducible here yet")


def _weights(f: Fields, which: str, mbw: bool, arch: str) -> Noted:
    """A block-weighted value: SuperMerger merges only the keys its block rule maps to a block, even without MBW."""
    base = f.number(f"base_{which}", 0.0, text_ok=True)
    if not mbw:
        return Noted({"default": base}, f"sd_merge_recipe.base_{which} for every block (MBW off; keys the block "
                                        "rule leaves out keep A, as in SuperMerger)")
    raw = f.get(f"weights_{which}", (list,))
    values = []
    for i, item in enumerate(raw):
        if isinstance(item, bool) or not isinstance(item, (int, float, str)):
            raise CheckpointError(f"{f.where}.weights_{which}[{i}]: expected a number, got {item!r}"[:200])
        try:
            values.append(float(item))
        except ValueError:
            raise CheckpointError(f"{f.where}.weights_{which}[{i}]: {item!r} is not a number"[:200]) from None
    spec = arch_spec(arch)
    expected = spec.blocks.supermerger_weights
    if len(values) not in expected:
        extra = " (SuperMerger's extended per-layer XL weights are not reproducible here yet)" \
            if len(values) == 109 else ""
        raise CheckpointError(f"{f.where}.weights_{which}: {len(values)} block weights for "
                              f"{spec.name}; expected "
                              f"{' or '.join(map(str, expected))}{extra}")
    blocks = spec.blocks.length - 1  # IN.., M00, OUT..: BASE comes from base_<which>
    vector = [base, *values[:blocks]]
    last = spec.blocks.depth - 1
    layout = f"IN00..IN{last:02d}, M00, OUT00..OUT{last:02d}"
    if max(expected) > blocks:
        layout += "; its unused VAE slot dropped"
    return Noted(vector, f"BASE from sd_merge_recipe.base_{which}, then sd_merge_recipe.weights_{which} ({layout})")


def _model(ref: InputRef) -> Any:
    where = f"sd_merge_recipe.{ref.alias}"
    if ref.sha256 is None:
        return Noted(None, f"{ref.role}: no hash recorded ({where} is empty); give the file with -m {ref.alias}=PATH")
    named = f' "{ref.name}"' if ref.name else ""
    legacy = f", legacy hash {ref.legacy}" if ref.legacy else ""
    return Noted(Flow({"sha256": ref.sha256}), f"{ref.role}{named}{legacy} ({where}; name from sd_merge_models)")


def _convention_note(date: str | None, given: str | None) -> str:
    source = "given with --date" if given else "modelspec.date"
    if date is None:
        return (f"SuperMerger's block rule since {RULE_CHANGE} (the file does not say when it was merged; for "
                f"older files use supermerger-2023, where SDXL time_embed/label_emb were not merged)")
    if date >= RULE_CHANGE:
        return f"SuperMerger's block rule since {RULE_CHANGE}; merged {date} ({source})"
    return f"SuperMerger's block rule of 2023-07-21 to {RULE_CHANGE}; merged {date} ({source})"


def _arithmetic(method: str, date: str | None) -> tuple[str, bool]:
    """(our method, whether SuperMerger computed it in the inputs' own dtype) for the version of `date` (None: the
    current version)."""
    if method == "add_difference":
        if date is not None and ROUNDED_DELTA_SINCE <= date < RULE_CHANGE:
            return "add_rounded_difference", False
        return method, True
    if method in ("weighted_sum", "triple_sum", "sum_twice"):
        return method, date is not None and date < LERP_SINCE
    return method, False


def _storage(pub: PublishedFile, shas: list[str | None], assume: Assumptions) -> str | None:
    """The inputs' storage dtype: from the model index when every input is there, else the published file's (the
    inputs most likely had the dtype the merge was saved in); None when the index shows mixed dtypes."""
    known = [assume.input_dtype(sha) if sha else None for sha in shas]
    if all(known):
        return known[0] if len(set(known)) == 1 else None
    return pub.dominant_dtype() if not any(known) else None


def _output(pub: PublishedFile, method: str, in_storage: bool, storage: str | None) -> dict[str, Any]:
    saved = pub.dominant_dtype() or "F16"
    output: dict[str, Any] = {
        "path": Noted(f"{pub.path.stem}-reproduced.safetensors",
                      "a new name, so the reproduction never replaces the published file"),
        "dtype": Noted(DTYPE_NAMES.get(saved, "fp16"), "the published file's dtype")}
    if in_storage and storage in ("F16", "BF16"):
        output["compute_dtype"] = Noted(DTYPE_NAMES[storage], "this SuperMerger version computes the mode in the "
                                        "inputs' dtype, one rounding per operation: reproduced bit for bit")
    elif method == "add_rounded_difference":
        output["compute_dtype"] = Noted("fp32", "SuperMerger (2025-01-20 to 2025-11-26) kept B - C in the inputs' "
                                        "dtype (add_rounded_difference) and added it in fp32: reproduced bit for bit")
    elif in_storage:
        output["compute_dtype"] = Noted("fp32", "SuperMerger computed in the inputs' dtype (fp32 here)")
    else:
        output["compute_dtype"] = Noted("fp32", "SuperMerger computes this mode in fp32 (torch.lerp) and rounds "
                                        "to the output dtype: expect at most a rounding step of difference")
    output["missing_keys"] = Noted("take_first", "SuperMerger keeps A's keys that B lacks and adds B's keys A lacks")
    return output
