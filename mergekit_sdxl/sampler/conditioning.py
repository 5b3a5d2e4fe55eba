"""Prompt -> cross-attention context (and SDXL pooled embedding), with AUTOMATIC1111 parity.

- Prompts are parsed and chunked as A1111 does (`prompt.py`); each 77-token chunk is encoded separately and the
  chunks are concatenated on the token axis.
- Emphasis "Original" (A1111's default): per encoder and chunk, `z *= w` then `z *= mean_before / mean_after`.
- SDXL: CLIP-L `hidden_states[11]` (its penultimate layer) ++ OpenCLIP-bigG `hidden_states[-2]` (2048
  channels); the pooled embedding is bigG's projected EOS state of chunk 0; bigG pads with id 0 after the first EOS.
- SD1.5: last hidden state, or with clip skip N > 1 `hidden_states[-N]` through the final LayerNorm.
- Empty negative prompt on SDXL: zeros for context and pooled (A1111; diffusers does this only for a missing
  negative, ComfyUI encodes ""). SD1.5 encodes "" (A1111 too).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from mergekit_sdxl.errors import PromptError
from mergekit_sdxl.sampler import tokens
from mergekit_sdxl.sampler.prompt import Chunk, chunk_prompt

if TYPE_CHECKING:
    from mergekit_sdxl.sampler.embeddings import Embedding, EmbeddingSet

_R = TypeVar("_R")

TE2_PAD = 0
SDXL_CLIP_L_LAYER = 11  # A1111's `layer_idx`: CLIP-L's penultimate layer, also for files pruned of layer 11


@dataclass
class Cond:
    """Encoded prompt: `context` [1, 77*chunks, D]; `pooled` [1, P] on SDXL, else None."""

    context: torch.Tensor
    pooled: torch.Tensor | None = None


def chunks_for(prompt: str, encoder: str = "te1", embeddings: EmbeddingSet | None = None) -> list[Chunk]:
    """A1111 chunks of `prompt` as `encoder` ("te1" or "te2") tokenizes it (te1 padding: EOS)."""
    find = None if embeddings is None else embeddings.find
    return chunk_prompt(prompt, lambda pieces: tokens.tokenize_pieces(pieces, encoder), tokens.BOS, tokens.EOS,
                        tokens.comma_id(), find)


def pad_after_first_eos(ids: torch.Tensor, pad: int = TE2_PAD) -> torch.Tensor:
    """Replace every position after the first EOS of each row with `pad` (OpenCLIP-bigG's padding)."""
    first = (ids == tokens.EOS).int().argmax(dim=-1, keepdim=True)
    positions = torch.arange(ids.shape[-1], device=ids.device)[None]
    return torch.where(positions > first, torch.full_like(ids, pad), ids)


def apply_emphasis(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111 "Original" emphasis per chunk row: scale by weights, then restore each row's mean."""
    if bool((weights == 1).all()):
        return z
    dtype, z = z.dtype, z.float()
    mean_before = z.mean(dim=(1, 2), keepdim=True)
    z = z * weights[..., None].float()
    return (z * (mean_before / z.mean(dim=(1, 2), keepdim=True))).to(dtype)


def _place_embeddings(token_embeds: torch.Tensor, fixes: list[list[tuple[int, Embedding]]], key: str) -> torch.Tensor:
    """Token embeddings with each embedding's vectors after BOS + offset (A1111's EmbeddingsWithFixes)."""
    out = token_embeds.clone()
    for row, row_fixes in enumerate(fixes):
        for offset, embedding in row_fixes:
            vectors = embedding.vectors_for(key).to(out.device, out.dtype)
            count = min(out.shape[1] - offset - 1, vectors.shape[0])
            out[row, offset + 1 : offset + 1 + count] = vectors[:count]
    return out


def _text_model(encoder: Any) -> Any:
    return getattr(encoder, "text_model", encoder)


class PromptEncoder:
    """Encodes prompts with one model's text encoders (te2 is None on SD1.5).

    The encoders are transformers' CLIP text models, typed Any: torch's Module typing would hide their
    `config`, `text_model` and output fields.
    """

    def __init__(self, te1: Any, te2: Any | None = None, clip_skip: int = 1,
                 embeddings: EmbeddingSet | None = None) -> None:
        if clip_skip < 1:
            raise ValueError("clip_skip counts from 1 (1 = last layer)")
        self.te1, self.te2, self.clip_skip, self.embeddings = te1, te2, clip_skip, embeddings

    @property
    def is_sdxl(self) -> bool:
        """True when a second (OpenCLIP-bigG) encoder is present."""
        return self.te2 is not None

    @torch.inference_mode()
    def encode(self, prompt: str, negative: bool = False) -> Cond:
        """Encode one prompt; `negative=True` with an empty prompt gives SDXL's zero conditioning."""
        te2 = self.te2
        if te2 is not None and negative and prompt == "":
            return self._zeros(te2)
        chunks = chunks_for(prompt, "te1", self.embeddings)
        if te2 is None:
            z = apply_emphasis(self._run(self.te1, chunks, "clip_l", self._encode_sd15), self._weights(chunks))
            return Cond(context=z.reshape(1, -1, z.shape[-1]))
        chunks2 = chunks_for(prompt, "te2", self.embeddings)
        if len(chunks2) != len(chunks):
            raise PromptError(f"prompt {prompt!r}: its HTML entities make CLIP-L and OpenCLIP-bigG split it into "
                              f"{len(chunks)} and {len(chunks2)} chunks; A1111 cannot encode it either")
        hidden1 = self._run(self.te1, chunks, "clip_l",
                            lambda ids: self.te1(ids, output_hidden_states=True).hidden_states[SDXL_CLIP_L_LAYER])
        z1 = apply_emphasis(hidden1, self._weights(chunks))
        out2 = self._run(te2, chunks2, "clip_g", lambda ids: te2(pad_after_first_eos(ids), output_hidden_states=True))
        z2 = apply_emphasis(out2.hidden_states[-2], self._weights(chunks2))
        z = torch.cat([z1, z2.to(z1.dtype)], dim=-1)
        return Cond(context=z.reshape(1, -1, z.shape[-1]), pooled=out2.text_embeds[:1])

    def embedding_names(self, prompt: str) -> list[str]:
        """Names of the embeddings `prompt` uses, in order of first use."""
        if self.embeddings is None:
            return []
        found = [e.name for c in chunks_for(prompt, "te1", self.embeddings) for _, e in c.fixes]
        return list(dict.fromkeys(found))

    def _weights(self, chunks: list[Chunk]) -> torch.Tensor:
        return torch.tensor([c.weights for c in chunks], device=next(self.te1.parameters()).device)

    def _run(self, encoder: Any, chunks: list[Chunk], key: str, call: Callable[[torch.Tensor], _R]) -> _R:
        """`call(ids)` on `encoder` with the chunks' embedding vectors put in place of their placeholders."""
        device = next(encoder.parameters()).device
        ids = torch.tensor([c.tokens for c in chunks], device=device)
        fixes = [c.fixes for c in chunks]
        if not any(fixes):
            return call(ids)
        layer = _text_model(encoder).embeddings.token_embedding
        handle = layer.register_forward_hook(lambda _m, _i, out: _place_embeddings(out, fixes, key))
        try:
            return call(ids)
        finally:
            handle.remove()

    def _encode_sd15(self, ids: torch.Tensor) -> torch.Tensor:
        if self.clip_skip == 1:
            return self.te1(ids).last_hidden_state
        hidden = self.te1(ids, output_hidden_states=True).hidden_states[-self.clip_skip]
        return _text_model(self.te1).final_layer_norm(hidden)

    def _zeros(self, te2: Any) -> Cond:
        p1 = next(self.te1.parameters())
        width = self.te1.config.hidden_size + te2.config.hidden_size
        context = torch.zeros(1, tokens.MAX_LENGTH, width, device=p1.device, dtype=p1.dtype)
        pooled = torch.zeros(1, te2.config.projection_dim, device=p1.device, dtype=p1.dtype)
        return Cond(context=context, pooled=pooled)
