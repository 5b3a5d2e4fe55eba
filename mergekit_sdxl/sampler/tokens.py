"""The shipped CLIP BPE tokenizer (49,408 tokens), loaded from package data; never from a hub."""

from __future__ import annotations

import functools
import html
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

TOKENIZER_DIR = Path(__file__).resolve().parent / "tokenizer"
BOS, EOS = 49406, 49407
MAX_LENGTH = 77


@functools.lru_cache(maxsize=1)
def clip_tokenizer() -> CLIPTokenizer:
    """The CLIP tokenizer (transformers `CLIPTokenizer`), pads with `<|endoftext|>`; cached."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), local_files_only=True)


@functools.lru_cache(maxsize=1)
def clip_tokenizer_2() -> CLIPTokenizer:
    """The same vocabulary set up as SDXL's `tokenizer_2`: pads with `!` (id 0), as diffusers ships it."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), local_files_only=True, pad_token="!")


@functools.lru_cache(maxsize=1)
def comma_id() -> int:
    """Token id of a comma that ends a word (`,</w>`), the chunk back-off point."""
    found = clip_tokenizer().convert_tokens_to_ids(",</w>")
    assert isinstance(found, int)  # one token in, one id out
    return found


def normalize(text: str, encoder: str = "te1") -> str:
    """Text as the CLIP tokenizers see it: `ftfy.fix_text` (full-width forms, HTML entities, curly quotes,
    ligatures, BOMs ...), whitespace runs to one space, lower case. OpenCLIP's tokenizer (SDXL's te2) also
    unescapes HTML twice and strips the ends."""
    import ftfy

    text = ftfy.fix_text(text)
    if encoder == "te2":
        text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


def tokenize_pieces(pieces: list[str], encoder: str = "te1") -> list[list[int]]:
    """Token ids of each string (normalized for `encoder`), without BOS/EOS and without truncation."""
    if not pieces:
        return []
    texts = [normalize(p, encoder) for p in pieces]
    return clip_tokenizer()(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
