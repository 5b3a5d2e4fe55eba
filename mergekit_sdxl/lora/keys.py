"""Adapter file keys (torch-free, so `inspect` can tell an adapter from a checkpoint without importing torch):
the key suffixes of every format the reader knows (kohya, peft, diffusers, LyCORIS) and which algorithm a module's
parts make. lora/formats.py computes the deltas.
"""

from __future__ import annotations

from collections.abc import Iterable

# file key suffix -> our part name; longest suffixes are tried first
SUFFIXES: dict[str, str] = {
    "lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid",
    "lora_A.weight": "down", "lora_B.weight": "up",
    "lora.down.weight": "down", "lora.up.weight": "up",
    "lora_linear_layer.down.weight": "down", "lora_linear_layer.up.weight": "up",
    "alpha": "alpha",
    "hada_w1_a": "hada_w1_a", "hada_w1_b": "hada_w1_b", "hada_w2_a": "hada_w2_a", "hada_w2_b": "hada_w2_b",
    "hada_t1": "hada_t1", "hada_t2": "hada_t2",
    "lokr_w1": "lokr_w1", "lokr_w1_a": "lokr_w1_a", "lokr_w1_b": "lokr_w1_b",
    "lokr_w2": "lokr_w2", "lokr_w2_a": "lokr_w2_a", "lokr_w2_b": "lokr_w2_b", "lokr_t1": "lokr_t1",
    "lokr_t2": "lokr_t2",
    "diff": "diff", "diff_b": "diff_b", "w_norm": "w_norm", "b_norm": "b_norm",
    "dora_scale": "dora_scale", "lora_magnitude_vector": "dora_scale", "lora_magnitude_vector.weight": "dora_scale",
}
_ORDERED_SUFFIXES = sorted(SUFFIXES, key=len, reverse=True)
ALGOS = ("lora", "loha", "lokr", "full", "norm")


def algo_of(parts: Iterable[str]) -> str:
    """The algorithm one module's part names make (ALGOS), "" when they make no known combination."""
    parts = set(parts)
    if {"down", "up"} <= parts:
        return "lora"
    if {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= parts:
        return "loha"
    if ("lokr_w1" in parts or {"lokr_w1_a", "lokr_w1_b"} <= parts) and (
            "lokr_w2" in parts or {"lokr_w2_a", "lokr_w2_b"} <= parts):
        return "lokr"
    if "diff" in parts or "diff_b" in parts:
        return "full"
    return "norm" if "w_norm" in parts or "b_norm" in parts else ""


def split_key(key: str) -> tuple[str, str] | None:
    """(module name as written, part) of an adapter key, or None when no known suffix ends it."""
    for suffix in _ORDERED_SUFFIXES:
        if key.endswith("." + suffix) and len(key) > len(suffix) + 1:
            return key[: -len(suffix) - 1], SUFFIXES[suffix]
    return None


__all__ = ["ALGOS", "SUFFIXES", "algo_of", "split_key"]
