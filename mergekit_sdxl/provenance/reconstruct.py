"""`recipe-from`: which tool wrote a file's recipe, and the recipe text that redoes the merge.

Dispatch on the metadata: `mergekit_sdxl.recipe` (ours) first, unless `sd_merge_recipe.type` names another tool
(A1111's merger copies the inputs' metadata, ours included, into the files it writes: there `sd_merge_recipe` is
the newest record); else `sd_merge_recipe.type`: "webui" (A1111's checkpoint merger) or "sd-webui-supermerger"
(SuperMerger). Anything else is named in a clear error.
"""

from __future__ import annotations

from mergekit_sdxl import __version__
from mergekit_sdxl.errors import CheckpointError
from mergekit_sdxl.provenance import a1111, ours, supermerger
from mergekit_sdxl.provenance.published import Assumptions, PublishedFile, Reconstruction, _kind
from mergekit_sdxl.provenance.recipe_text import render

OURS = "mergekit-sdxl"  # sd_merge_recipe.type in the files this tool writes (io/metadata.py)
READERS = {a1111.TYPE: a1111.TOOL, supermerger.TYPE: supermerger.TOOL, OURS: ours.TOOL}


def reconstruct(pub: PublishedFile, assume: Assumptions | None = None) -> Reconstruction:
    """The recipe recorded in `pub`'s metadata, rebuilt.

    Raises:
        CheckpointError: no recipe in the metadata, an unknown tool, a mode or option without a formula here,
            or malformed metadata (each naming the file, metadata key and field).
    """
    assume = assume or Assumptions()
    recipe = pub.json("sd_merge_recipe")
    if ours.KEY in pub.metadata and (not isinstance(recipe, dict) or recipe.get("type") == OURS):
        return ours.reconstruct(pub.json(ours.KEY), pub)
    if recipe is None:
        raise CheckpointError(f"{pub.name}: carries no merge recipe (no sd_merge_recipe or {ours.KEY} in its "
                              "metadata); nothing to reproduce")
    if not isinstance(recipe, dict):
        raise CheckpointError(f"{pub.where('sd_merge_recipe')}: expected a JSON object, got {_kind(recipe)}")
    kind = recipe.get("type")
    if kind == a1111.TYPE:
        return a1111.reconstruct(recipe, pub, assume)
    if kind == supermerger.TYPE:
        return supermerger.reconstruct(recipe, pub, assume)
    raise CheckpointError(f"{pub.where('sd_merge_recipe')}: written by an unknown tool (type {str(kind)[:60]!r}); "
                          f"recipe-from reads {', '.join(f'{t!r} ({n})' for t, n in READERS.items())}")


def recipe_text(rebuilt: Reconstruction, command: str) -> str:
    """The YAML recipe, with a header saying where it came from and how to run it."""
    header = [*rebuilt.header,
              f"Written by mergekit-sdxl {__version__}. Models are named by hash: index the folders that hold them "
              "(`mergekit-sdxl index DIR`) or pass --models-dir DIR to merge.",
              f"Check the result: {command}",
              ""]
    header += [f"Note: {warning}" for warning in rebuilt.warnings]
    return render(rebuilt.data, header)
