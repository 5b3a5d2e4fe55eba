"""What the index records about a file besides its hashes, read from the safetensors header only.

Format, kind (checkpoint / vae / lora / other), architecture, the dtype holding most tensor bytes, tensor count,
title, and the merge lineage the file carries (`sd_merge_recipe`, `sd_merge_models`). PyTorch pickles are hashed
but not opened (reading their keys means reading the whole file). A header that cannot be read is recorded as an
error on the row; the file's hashes stay valid and findable.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from mergekit_sdxl.arch.detect import detect_arch
from mergekit_sdxl.errors import MergekitError
from mergekit_sdxl.io.reader import SafetensorsReader, sniff
from mergekit_sdxl.provenance.jsontext import MAX_JSON_CHARS, load_metadata_json

_LORA_MARKERS = ("lora_down", "lora_up", "lora_A", "lora_B", "hada_w1", "lokr_w1", "oft_blocks", "oft_diag")
_BARE_VAE = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


@dataclass(frozen=True)
class FileFacts:
    """Header facts of one file (see `mergekit_sdxl.index.store.Entry` for the fields' meaning)."""

    format: str
    kind: str = "other"
    arch: str | None = None
    dtype: str | None = None
    tensors: int | None = None
    title: str | None = None
    merge_type: str | None = None
    merge_recipe: str | None = None
    merge_models: str | None = None
    error: str | None = None


def describe(path: str | Path) -> FileFacts:
    """Read `path`'s header (never its tensor data) and summarise it; errors become `FileFacts.error`."""
    p = Path(path)
    try:
        kind = sniff(p)
    except MergekitError as exc:
        return FileFacts("unknown", error=str(exc))
    if kind != "safetensors":
        return FileFacts(kind if kind != "unknown" else p.suffix.lstrip(".").lower() or "unknown")
    try:
        with SafetensorsReader(p) as reader:
            infos = reader.infos()
            metadata = dict(reader.metadata)
    except MergekitError as exc:
        return FileFacts("safetensors", error=str(exc))
    keys = [i.key for i in infos]
    weight: Counter[str] = Counter()
    for info in infos:
        weight[info.dtype] += info.nbytes
    dtype = weight.most_common(1)[0][0] if weight else None
    arch, kind = _kind(keys)
    recipe = _bounded(metadata.get("sd_merge_recipe"))
    return FileFacts("safetensors", kind, arch, dtype, len(keys), _title(metadata), _merge_type(recipe, metadata),
                     recipe, _bounded(metadata.get("sd_merge_models")))


def _kind(keys: list[str]) -> tuple[str | None, str]:
    try:
        return detect_arch(keys), "checkpoint"
    except MergekitError:
        pass
    if any(marker in key for key in keys for marker in _LORA_MARKERS):
        return None, "lora"
    if keys and all(key.startswith(_BARE_VAE) or key.startswith("first_stage_model.") for key in keys):
        return None, "vae"
    return None, "other"


def _title(metadata: dict[str, str]) -> str | None:
    title = metadata.get("modelspec.title") or metadata.get("ss_output_name")
    return title[:200] if title else None


def _bounded(text: str | None) -> str | None:
    return text if text and len(text) <= MAX_JSON_CHARS else None


def _merge_type(recipe: str | None, metadata: dict[str, str]) -> str | None:
    """The merge tool that wrote the file: `sd_merge_recipe.type` ("webui", "sd-webui-supermerger", ...)."""
    if "mergekit_sdxl.recipe" in metadata:
        return "mergekit-sdxl"
    if not recipe:
        return None
    try:
        parsed = load_metadata_json(recipe, "sd_merge_recipe")
    except MergekitError:
        return "unreadable"
    kind = parsed.get("type") if isinstance(parsed, dict) else None
    return str(kind)[:64] if kind is not None else "unknown"
