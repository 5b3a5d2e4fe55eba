"""Tokenizer, A1111 prompt syntax and 75-token chunking; nothing reaches the network."""

from __future__ import annotations

import socket

import pytest

from mergekit_sdxl.sampler import prompt, tokens
from mergekit_sdxl.sampler.conditioning import chunks_for, pad_after_first_eos

# AUTOMATIC1111's parse_prompt_attention doctest cases
A1111_CASES = [
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
      [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]]),
]


@pytest.mark.parametrize(("text", "expected"), A1111_CASES)
def test_a1111_doctest_cases(text, expected):
    assert prompt.parse_prompt_attention(text) == expected  # exact floats, same multiplication order


def test_more_syntax():
    parse = prompt.parse_prompt_attention
    assert parse("") == [["", 1.0]]
    assert parse("[x]") == [["x", 1 / 1.1]]
    assert parse("(x:-0.5)") == [["x", -0.5]]
    assert parse("a \\\\ b") == [["a \\ b", 1.0]]
    assert parse("a:b") == [["a:b", 1.0]]
    assert parse("a BREAK b") == [["a", 1.0], ["BREAK", -1.0], ["b", 1.0]]
    assert parse("aBREAK b") == [["aBREAK b", 1.0]]  # BREAK must be its own word
    assert parse("(a BREAK b)") == [["a", 1.1], ["BREAK", -1.1], ["b", 1.1]]  # A1111 multiplies the marker too


def test_tokenizer_ids_and_offline(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a socket was opened")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    tokens.clip_tokenizer.cache_clear()
    tokens.clip_tokenizer_2.cache_clear()
    tok = tokens.clip_tokenizer()
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408
    assert tok.pad_token_id == 49407 and tokens.clip_tokenizer_2().pad_token_id == 0
    assert tokens.comma_id() == 267


def test_single_chunk_layout():
    [chunk] = chunks_for("a photo of a (cat:1.5)")
    assert len(chunk.tokens) == 77 and len(chunk.weights) == 77
    assert chunk.tokens[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert chunk.tokens[7:] == [49407] * 70
    assert chunk.weights[5] == 1.5 and chunk.weights[4] == 1.0 and chunk.weights[0] == 1.0
    import torch

    padded = pad_after_first_eos(torch.tensor([chunk.tokens]))[0].tolist()
    assert padded[:7] == chunk.tokens[:7] and padded[7:] == [0] * 70


def test_long_prompt_chunks_and_comma_backoff():
    cat, dog = tokens.tokenize_pieces(["cat", "dog"])
    assert len(cat) == 1 and len(dog) == 1
    text = " ".join(["cat"] * 119)  # 119 tokens: two chunks, 154 positions once encoded
    chunks = chunks_for(text)
    assert [len(c.tokens) for c in chunks] == [77, 77]
    assert chunks[0].tokens[1:76] == cat * 75 and chunks[0].tokens[76] == 49407
    assert chunks[1].tokens[1:45] == cat * 44 and chunks[1].tokens[45:] == [49407] * 32

    # a comma within 20 tokens of the chunk end: the text after it moves to the next chunk
    chunks = chunks_for(" ".join(["cat"] * 70) + ", " + " ".join(["dog"] * 10))
    assert chunks[0].tokens[71] == 267 and chunks[0].tokens[72:] == [49407] * 5
    assert chunks[1].tokens[1:11] == dog * 10 and chunks[1].tokens[11:] == [49407] * 66

    # a comma further back than 20 tokens: no back-off, a hard cut at 75
    chunks = chunks_for(" ".join(["cat"] * 30) + ", " + " ".join(["dog"] * 60))
    assert chunks[0].tokens[75] == dog[0] and chunks[1].tokens[1:16] == dog * 15


def test_break_starts_new_chunk():
    chunks = chunks_for("a cat BREAK a dog")
    assert len(chunks) == 2
    assert chunks[0].tokens[:4] == [49406, 320, 2368, 49407]
    assert chunks[1].tokens[:4] == [49406, 320, 1929, 49407]
