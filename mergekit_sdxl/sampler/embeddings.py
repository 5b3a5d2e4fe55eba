"""Textual-inversion embeddings found by name in prompts, as A1111 loads and matches them.

A folder (searched recursively) holds one embedding per file, named after the file (`easynegative.safetensors`
-> `easynegative`). Formats, as A1111 reads them:

- A1111 `.pt`: `string_to_param: {"*": [n, 768]}` (read with `torch.load(weights_only=True)` only; files that
  need unpickling are skipped with a reason);
- one-tensor files: kohya `emb_params` [n, dim], diffusers `{"<token>": [dim] or [n, dim]}`;
- SDXL: `clip_l` [n, 768] and `clip_g` [n, 1280] (safetensors).

An embedding whose width does not fit the model (its text encoders' widths added up: 768 on SD1.5, 768 + 1280 on
SDXL) is skipped and its name stays plain text, as in A1111. In a prompt, the name's tokens are replaced by its n
vectors (`find`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

EXTENSIONS = (".pt", ".bin", ".safetensors")


@dataclass
class Embedding:
    """One loaded embedding: its name, vectors (per encoder key on SDXL) and file."""

    name: str
    vectors_by_key: dict[str, torch.Tensor]
    path: Path
    vectors: int = 0
    width: int = 0

    def vectors_for(self, key: str) -> torch.Tensor:
        """The [n, width] vectors for encoder `key` ("clip_l" or "clip_g"); one-encoder files serve both."""
        vectors = self.vectors_by_key.get(key, self.vectors_by_key.get("*"))
        if vectors is None:
            raise ValueError(f"embedding {self.name!r} has no vectors for {key}")
        return vectors

    @property
    def shorthash(self) -> str:
        """A1111's `TI hashes` value: the first 12 hex digits of the file's sha256."""
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()[:12]


def _load_file(path: Path) -> dict:
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpicklable or corrupt: skipped with its reason
        raise ValueError(f"cannot be read without unpickling code ({type(exc).__name__})") from exc


def read_embedding(path: str | os.PathLike[str]) -> Embedding:
    """Parse one embedding file (ValueError with a reason when it is none of the known formats)."""
    path = Path(path)
    data = _load_file(path)
    if not isinstance(data, dict):
        raise ValueError("not a dict of tensors")
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise ValueError("string_to_param must hold exactly one tensor")
        by_key = {"*": next(iter(params.values()))}
    elif "clip_l" in data and "clip_g" in data:
        by_key = {"clip_l": data["clip_l"], "clip_g": data["clip_g"]}
    elif len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):
        by_key = {"*": next(iter(data.values()))}
    else:
        raise ValueError("neither string_to_param, clip_l/clip_g nor a single tensor")
    by_key = {k: (v[None] if v.ndim == 1 else v).detach().float() for k, v in by_key.items()}
    if any(not isinstance(v, torch.Tensor) or v.ndim != 2 for v in by_key.values()):
        raise ValueError("embedding vectors must be [n, width]")
    width = sum(v.shape[-1] for v in by_key.values())
    return Embedding(path.stem, by_key, path, vectors=next(iter(by_key.values())).shape[0], width=width)


@dataclass
class EmbeddingSet:
    """The embeddings of a folder usable with one architecture, and those skipped (name -> reason)."""

    embeddings: dict[str, Embedding] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    _lookup: dict[int, list[tuple[list[int], Embedding]]] = field(default_factory=dict)

    @classmethod
    def load(cls, folder: str | os.PathLike[str], width: int) -> EmbeddingSet:
        """Every embedding under `folder` whose vectors are `width` wide (the text encoders' widths added up)."""
        from mergekit_sdxl.sampler import tokens

        out = cls()
        for root, _dirs, files in os.walk(folder, followlinks=True):
            for name in sorted(files):
                path = Path(root) / name
                if path.suffix.lower() not in EXTENSIONS or path.stat().st_size == 0:
                    continue
                try:
                    embedding = read_embedding(path)
                except (ValueError, OSError, RuntimeError) as exc:
                    out.skipped[path.stem] = f"{path}: {exc}"
                    continue
                if embedding.width != width:
                    out.skipped[path.stem] = f"{path}: width {embedding.width}, the model needs {width}"
                    continue
                out.add(embedding, tokens.tokenize_pieces([embedding.name])[0])
        return out

    def add(self, embedding: Embedding, name_ids: list[int]) -> None:
        """Register `embedding` under the token ids of its name (longest names are matched first)."""
        if not name_ids:
            return
        self.embeddings[embedding.name] = embedding
        entries = [e for e in self._lookup.get(name_ids[0], []) if e[1].name != embedding.name]
        self._lookup[name_ids[0]] = sorted([*entries, (name_ids, embedding)], key=lambda e: len(e[0]), reverse=True)

    def find(self, ids: list[int], position: int) -> tuple[Embedding, int] | None:
        """The embedding whose name's tokens start at `position`, and how many tokens that name covers."""
        for name_ids, embedding in self._lookup.get(ids[position], ()):
            if ids[position : position + len(name_ids)] == name_ids:
                return embedding, len(name_ids)
        return None
