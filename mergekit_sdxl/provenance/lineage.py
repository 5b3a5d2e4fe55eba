"""The lineage tree of a merged file, from the `sd_merge_models` it carries.

A1111 records every ancestor (sha256 -> name, legacy hash, that model's own `sd_merge_recipe`) in one flat map
that grows with each generation; SuperMerger records the direct inputs only; this tool does as A1111. The tree
starts at the file's own recipe and follows each input's recorded recipe. Cycles and absurd depths (hostile
metadata) are cut and marked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mergekit_sdxl.errors import MergekitError
from mergekit_sdxl.provenance import a1111, ours, supermerger
from mergekit_sdxl.provenance.jsontext import load_metadata_json
from mergekit_sdxl.provenance.published import PublishedFile, recorded_name, sd_merge_models

MAX_DEPTH = 24
MAX_NODES = 2000
_ROLE_KEYS = {  # recipe type -> the fields naming its inputs, in order
    a1111.TYPE: ("primary_model_hash", "secondary_model_hash", "tertiary_model_hash"),
    supermerger.TYPE: ("model_a", "model_b", "model_c"),
    "mergekit-sdxl": ("primary_model_hash", "secondary_model_hash", "tertiary_model_hash"),
}


@dataclass
class LineageNode:
    """One model of the tree: its recorded name and hashes, how it was made, where it is locally (or None)."""

    label: str  # "A", "B", "C" or an alias; the root's is the file name
    sha256: str | None
    name: str | None
    legacy: str | None
    made_by: str | None  # a one-line summary of its recipe; None for a model with no recorded recipe
    local: str | None = None
    note: str | None = None  # "cycle", "depth limit", ...
    children: list[LineageNode] = field(default_factory=list)


def build_tree(pub: PublishedFile, locate: Callable[[str], str | None]) -> LineageNode:
    """The lineage of `pub`; `locate(sha256)` returns a local path for a model present on this machine."""
    models = sd_merge_models(pub)
    counter = [0]
    recipe, inputs = _root_recipe(pub)
    root = LineageNode(pub.name, None, pub.name, None, _summary(recipe))
    for label, sha in inputs:
        root.children.append(_node(label, sha, models, locate, {sha} if sha else set(), 1, counter))
    return root


def _root_recipe(pub: PublishedFile) -> tuple[Any, list[tuple[str, str | None]]]:
    if ours.KEY in pub.metadata:
        recorded = pub.json(ours.KEY)
        entries = recorded.get("inputs") if isinstance(recorded, dict) else None
        if isinstance(entries, dict):
            summary = {"type": "mergekit-sdxl", "interp_method": _steps_text(recorded)}
            return summary, [(str(alias), _sha(e.get("sha256")) if isinstance(e, dict) else None)
                             for alias, e in entries.items()]
    recipe = pub.json("sd_merge_recipe")
    return recipe, _inputs(recipe)


def _node(label: str, sha: str | None, models: dict[str, dict[str, Any]], locate: Callable[[str], str | None],
          seen: set[str], depth: int, counter: list[int]) -> LineageNode:
    counter[0] += 1
    name, legacy = recorded_name(models, sha)
    entry = models.get(sha or "")
    recipe = _recipe_of(entry)
    node = LineageNode(label, sha, name, legacy, _summary(recipe) if recipe is not None else None,
                       locate(sha) if sha else None)
    if recipe is None:
        return node
    if depth >= MAX_DEPTH or counter[0] >= MAX_NODES:
        node.note = "lineage cut here (too deep or too many models)"
        return node
    for child_label, child in _inputs(recipe):
        if child and child in seen:
            node.children.append(LineageNode(child_label, child, *recorded_name(models, child), None,
                                             note="cycle: already an ancestor on this path"))
            continue
        node.children.append(_node(child_label, child, models, locate, seen | ({child} if child else set()),
                                   depth + 1, counter))
    return node


def _recipe_of(entry: Any) -> Any:
    """An ancestor's recorded recipe: a JSON object (A1111 stores it parsed) or JSON text; None if absent/bad."""
    recipe = entry.get("sd_merge_recipe") if isinstance(entry, dict) else None
    if isinstance(recipe, str):
        try:
            recipe = load_metadata_json(recipe, "sd_merge_recipe")
        except MergekitError:
            return None
    return recipe if isinstance(recipe, dict) else None


def _inputs(recipe: Any) -> list[tuple[str, str | None]]:
    if not isinstance(recipe, dict):
        return []
    keys = _ROLE_KEYS.get(str(recipe.get("type")), ())
    count = _input_count(recipe)
    return [("ABC"[i], _sha(recipe.get(key))) for i, key in enumerate(keys[:count])]


def _input_count(recipe: dict[str, Any]) -> int:
    kind = recipe.get("type")
    if kind == supermerger.TYPE:
        mode, calc = str(recipe.get("mode", "")), str(recipe.get("calcmode", ""))
        return 3 if calc == "trainDifference" or any(m in mode for m in ("Add", "Triple", "Twice")) else 2
    if kind == a1111.TYPE:
        return {"No interpolation": 1, "Weighted sum": 2}.get(str(recipe.get("interp_method")), 3)
    return sum(1 for key in _ROLE_KEYS.get(str(kind), ()) if recipe.get(key))


def _sha(value: Any) -> str | None:
    return value.lower() if isinstance(value, str) and len(value) == 64 else None


def _summary(recipe: Any) -> str | None:
    if not isinstance(recipe, dict):
        return None
    kind = recipe.get("type")
    if kind == a1111.TYPE:
        return f"A1111 {recipe.get('interp_method')} {recipe.get('multiplier')}"
    if kind == supermerger.TYPE:
        mbw = " MBW" if recipe.get("mbw") else ""
        return (f"SuperMerger {str(recipe.get('mode', '')).split(':')[0]} ({recipe.get('calcmode', 'normal')}) "
                f"alpha {recipe.get('base_alpha')}{mbw}")
    if kind == "mergekit-sdxl":
        return f"mergekit-sdxl {str(recipe.get('interp_method', ''))[:100]}"
    return f"unknown tool (type {str(kind)[:40]!r})"


def _steps_text(recorded: dict[str, Any]) -> str:
    steps = recorded.get("steps")
    if not isinstance(steps, dict):
        return ""
    parts = []
    for name, step in list(steps.items())[:4]:
        what = (step.get("formula") or step.get("method") or "lora") if isinstance(step, dict) else "?"
        parts.append(f"{name}: {what}")
    return "; ".join(parts)


def render_tree(root: LineageNode) -> list[str]:
    """Text lines: one per model, indented with tree branches."""
    lines = [_line(root, root=True)]
    _children(root, "", lines)
    return lines


def _children(node: LineageNode, prefix: str, lines: list[str]) -> None:
    for i, child in enumerate(node.children):
        last = i == len(node.children) - 1
        lines.append(prefix + ("└── " if last else "├── ") + _line(child))
        _children(child, prefix + ("    " if last else "│   "), lines)


def _line(node: LineageNode, root: bool = False) -> str:
    if root:
        text = node.label
    else:
        short = node.sha256[:10] if node.sha256 else "(no hash recorded)"
        text = f"{node.label}: {short} {node.name or '(unnamed)'}"
        text += f"  [present: {node.local}]" if node.local else "  [absent]"
    if node.made_by:
        text += f"  <- {node.made_by}"
    if node.note:
        text += f"  ({node.note})"
    return text


def tree_dict(node: LineageNode) -> dict[str, Any]:
    """JSON-ready form of the tree."""
    return {"label": node.label, "sha256": node.sha256, "name": node.name, "legacy_hash": node.legacy,
            "made_by": node.made_by, "local": node.local, "note": node.note,
            "inputs": [tree_dict(child) for child in node.children]}
