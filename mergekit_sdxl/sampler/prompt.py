"""A1111 prompt syntax: attention weights, escapes, BREAK, and 75-token chunking.

Behaviour follows AUTOMATIC1111's `parse_prompt_attention` and `tokenize_line` (same weights to the last float
bit, same chunk boundaries), written independently here:

- `(x)` multiplies x's weight by 1.1, `[x]` divides it by 1.1, `(x:w)` multiplies it by w (spaces allowed around
  w, as since A1111 1.6: `(x: 1.5 )`); a weight that is not a number (`(x:1.2.3)`) is an error naming its position;
- `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are literal characters; a lone backslash is dropped;
- brackets left open at the end close there;
- `BREAK` (a word of its own) ends the current 75-token chunk;
- chunks are BOS + 75 tokens + EOS; a chunk that fills up moves the text after its last comma to the next chunk
  when that comma is within `COMMA_BACKTRACK` tokens of the end;
- a textual-inversion embedding whose name's tokens appear in the text takes that many placeholder positions
  (moved whole to the next chunk when it does not fit), its vectors put in place when encoding.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mergekit_sdxl.errors import PromptError

if TYPE_CHECKING:
    from mergekit_sdxl.sampler.embeddings import Embedding  # imports torch: for the type checker only

ROUND, SQUARE = 1.1, 1 / 1.1
BREAK_WEIGHT = -1.0  # marks a BREAK segment, as A1111 does
CHUNK_LENGTH = 75
COMMA_BACKTRACK = 20  # A1111's default `comma_padding_backtrack`

_TOKEN = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[list]:
    """Split `text` into `[piece, weight]` pairs (A1111 semantics); BREAK gives `["BREAK", -1.0]`.

    >>> parse_prompt_attention('an (important) word')
    [['an ', 1.0], ['important', 1.1], [' word', 1.0]]
    """
    out: list[list] = []
    open_round: list[int] = []
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for item in out[start:]:
            item[1] *= factor

    for match in _TOKEN.finditer(text):
        piece, number = match.group(0), match.group(1)
        if piece.startswith("\\"):
            out.append([piece[1:], 1.0])
        elif piece == "(":
            open_round.append(len(out))
        elif piece == "[":
            open_square.append(len(out))
        elif number is not None and open_round:
            scale(open_round.pop(), _number(number, text, match.start()))
        elif piece == ")" and open_round:
            scale(open_round.pop(), ROUND)
        elif piece == "]" and open_square:
            scale(open_square.pop(), SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(piece)):
                if i:
                    out.append(["BREAK", BREAK_WEIGHT])
                out.append([part, 1.0])
    for start in open_round:
        scale(start, ROUND)
    for start in open_square:
        scale(start, SQUARE)
    return _merge_equal_neighbours(out) if out else [["", 1.0]]


def _number(number: str, text: str, at: int) -> float:
    try:
        return float(number)
    except ValueError:  # A1111 stops with "could not convert string to float"
        raise PromptError(f"prompt {text!r}: weight {number!r} at character {at} is not a number") from None


def _merge_equal_neighbours(items: list[list]) -> list[list]:
    merged = [items[0]]
    for item in items[1:]:
        if item[1] == merged[-1][1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return merged


@dataclass
class Chunk:
    """One encoder call: BOS + 75 token ids + EOS (77), one weight per position, and embedding placements
    (offset among the 75, embedding object) whose vectors replace the token embeddings there."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    fixes: list[tuple[int, Embedding]] = field(default_factory=list)


Tokenize = Callable[[list[str]], list[list[int]]]
# (tokens, position) -> (embedding, number of name tokens it covers) or None
FindEmbedding = Callable[[list[int], int], "tuple[Embedding, int] | None"]
PLACEHOLDER = 0  # token id under an embedding's positions (A1111 writes 0 there)


def chunk_prompt(text: str, tokenize: Tokenize, bos: int, eos: int, comma: int,
                 find_embedding: FindEmbedding | None = None) -> list[Chunk]:
    """Tokenize `text` into 77-token chunks with per-token weights, as A1111's `tokenize_line` does.

    `tokenize(list_of_strings)` returns the token ids of each string without special tokens. Padding inside a
    chunk uses `eos` (callers re-pad for encoders that pad differently). `find_embedding` spots embedding names.
    """
    parsed = parse_prompt_attention(text)
    token_lists = tokenize([piece for piece, _ in parsed])
    builder = _ChunkBuilder(bos, eos, comma)
    for ids, (piece, weight) in zip(token_lists, parsed):
        if weight == BREAK_WEIGHT and piece == "BREAK":
            builder.close()
            continue
        position = 0
        while position < len(ids):
            builder.before_token(ids[position])
            found = find_embedding(ids, position) if find_embedding is not None else None
            if found is None:
                builder.append(ids[position], weight)
                position += 1
            else:
                builder.embed(found[0], weight)
                position += found[1]
    return builder.finish()


class _ChunkBuilder:
    """Accumulates weighted tokens into chunks with A1111's comma back-off."""

    def __init__(self, bos: int, eos: int, comma: int) -> None:
        self.bos, self.eos, self.comma = bos, eos, comma
        self.chunks: list[Chunk] = []
        self.current = Chunk()
        self.last_comma = -1

    def before_token(self, token: int) -> None:
        """Comma bookkeeping and chunk breaks that happen before `token` is placed."""
        current = self.current
        if token == self.comma:
            self.last_comma = len(current.tokens)
        elif (len(current.tokens) == CHUNK_LENGTH and self.last_comma != -1
              and len(current.tokens) - self.last_comma <= COMMA_BACKTRACK):
            cut = self.last_comma + 1
            moved = Chunk(current.tokens[cut:], current.weights[cut:])  # embedding placements stay (as in A1111)
            del current.tokens[cut:], current.weights[cut:]
            self.close()
            self.current = moved
        if len(self.current.tokens) == CHUNK_LENGTH:
            self.close()

    def append(self, token: int, weight: float) -> None:
        self.current.tokens.append(token)
        self.current.weights.append(weight)

    def embed(self, embedding: Embedding, weight: float) -> None:
        """Place an embedding's vectors, starting a new chunk when they do not fit in this one."""
        length = int(embedding.vectors)
        if len(self.current.tokens) + length > CHUNK_LENGTH:
            self.close()
        self.current.fixes.append((len(self.current.tokens), embedding))
        self.current.tokens += [PLACEHOLDER] * length
        self.current.weights += [weight] * length

    def close(self) -> None:
        chunk = self.current
        pad = CHUNK_LENGTH - len(chunk.tokens)
        chunk.tokens = [self.bos] + chunk.tokens + [self.eos] * pad + [self.eos]
        chunk.weights = [1.0] + chunk.weights + [1.0] * pad + [1.0]
        self.chunks.append(chunk)
        self.current = Chunk()
        self.last_comma = -1

    def finish(self) -> list[Chunk]:
        if self.current.tokens or not self.chunks:
            self.close()
        return self.chunks
