"""Prompt editing, alternation, AND and the attention grammar against A1111 (>= 1.6): its documented examples,
and a differential check against A1111's own scheduling grammar run by lark (the reference, test-only)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mergekit_sdxl.errors import PromptError
from mergekit_sdxl.sampler import tokens
from mergekit_sdxl.sampler.prompt import parse_prompt_attention
from mergekit_sdxl.sampler.prompt_schedule import prompt_schedule, split_and, text_at

# A1111's get_learned_conditioning_prompt_schedules doctests (10 steps)
A1111_SCHEDULES = [
    ("test", [[10, "test"]]),
    ("a [b:3]", [[3, "a "], [10, "a b"]]),
    ("a [b: 3]", [[3, "a "], [10, "a b"]]),
    ("a [[[b]]:2]", [[2, "a "], [10, "a [[b]]"]]),
    ("[(a:2):3]", [[3, ""], [10, "(a:2)"]]),
    ("a [b : c : 1] d", [[1, "a b  d"], [10, "a  c  d"]]),
    ("a[b:[c:d:2]:1]e", [[1, "abe"], [2, "ace"], [10, "ade"]]),
    ("a [unbalanced", [[10, "a [unbalanced"]]),
    ("a [b:.5] c", [[5, "a  c"], [10, "a b c"]]),
    ("((a][:b:c [d:3]", [[3, "((a][:b:c "], [10, "((a][:b:c d"]]),
    ("[a|(b:1.1)]", [[i, "a" if i % 2 else "(b:1.1)"] for i in range(1, 11)]),
    ("[fe|]male", [[i, "female" if i % 2 else "male"] for i in range(1, 11)]),
    ("[fe|||]male", [[i, "female" if i % 4 == 1 else "male"] for i in range(1, 11)]),
]


@pytest.mark.parametrize(("prompt", "expected"), A1111_SCHEDULES)
def test_a1111_schedule_examples(prompt, expected):
    assert [list(e) for e in prompt_schedule(prompt, 10)] == expected


def test_edit_extremes_and_call_lookup():
    assert prompt_schedule("[a:b:0.0]", 28) == [(28, "b")]
    assert prompt_schedule("[a:b:1.0]", 28) == [(28, "a")]
    assert prompt_schedule("x|y", 5) == [(5, "x|y")]  # unreadable for the grammar: literal text, as A1111
    schedule = prompt_schedule("[a:b:2]", 4)
    assert [text_at(schedule, k) for k in range(6)] == ["a", "a", "a", "b", "b", "a"]  # A1111's lookup


def test_and_split():
    # A1111 keeps a sub-prompt's leading space (the tokenizer drops it) and strips the rest
    assert split_and("a cat AND a dog:0.5") == [("a cat", 1.0), (" a dog", 0.5)]
    assert split_and("a cat :1.2 AND dog: -1") == [("a cat", 1.2), (" dog", -1.0)]
    assert split_and("ANDROID and AND") == [("ANDROID and", 1.0), ("", 1.0)]
    assert split_and("(x:1.5)") == [("(x:1.5)", 1.0)]


def test_spaced_weights_and_errors():
    assert parse_prompt_attention("(cat: 1.5)") == [["cat", 1.5]]
    assert parse_prompt_attention("(cat:1.5 )") == [["cat", 1.5]]
    assert parse_prompt_attention("a (cat : 0.5) b") == [["a ", 1.0], ["cat ", 0.5], [" b", 1.0]]
    for bad, at in (("(x:1.2.3)", 2), ("a (x:.)", 4), ("((x: +.5.))", 3)):
        with pytest.raises(PromptError, match=f"at character {at}"):
            parse_prompt_attention(bad)


@pytest.mark.parametrize(("text", "as_text"), [
    ("a，b", "a,b"), ("cat &amp; dog", "cat & dog"), ("“cat”", '"cat"'), ("\ufeffﬁsh", "fish"),
    ("ＣＡＴ（１）", "CAT(1)"),
])
def test_ftfy_normalisation_as_the_clip_tokenizers(text, as_text):
    """A1111's tokenizers run ftfy.fix_text first: full-width forms, entities, curly quotes, ligatures, BOM."""
    assert tokens.tokenize_pieces([text]) == tokens.tokenize_pieces([as_text])
    assert tokens.tokenize_pieces([text], "te2") == tokens.tokenize_pieces([as_text], "te2")
    assert tokens.tokenize_pieces(["a，b"])[0][1] == tokens.comma_id()  # the comma back-off sees it
    assert tokens.normalize("  Ａ\u3000B&nbsp;c ") == "a b c"


# ---- differential check against A1111's grammar (lark), as its prompt_parser.py declares it -----------------

A1111_GRAMMAR = r"""
!start: (prompt | /[][():]/+)*
prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*
!emphasized: "(" prompt ")"
        | "(" prompt ":" prompt ")"
        | "[" prompt "]"
scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
alternate: "[" prompt ("|" [prompt])+ "]"
WHITESPACE: /\s+/
plain: /([^\\\[\]():|]|\\.)+/
%import common.SIGNED_NUMBER -> NUMBER
"""


def _a1111_schedule(prompt, steps):
    """A1111's schedule semantics over the lark parse tree (written from its documented behaviour)."""
    import lark

    parser = _a1111_schedule.parser = getattr(_a1111_schedule, "parser", None) or lark.Lark(A1111_GRAMMAR)
    try:
        tree = parser.parse(prompt)
    except lark.exceptions.LarkError:
        return [(steps, prompt)]
    ends = {steps}
    for node in tree.iter_subtrees():
        if node.data == "scheduled":
            s = node.children[-2]
            v = float(s) * steps if "." in s else float(s)
            node.children[-2] = min(steps, int(v))
            if node.children[-2] >= 1:
                ends.add(node.children[-2])
        elif node.data == "alternate":
            ends.update(range(1, steps + 1))

    def render(node, step):
        if isinstance(node, lark.Token):
            return str(node)
        if node is None:
            return ""
        if node.data == "scheduled":
            before, after, _, when, _ = node.children
            return render(before, step) if step <= when else render(after, step)
        if node.data == "alternate":
            return render(node.children[(step - 1) % len(node.children)], step)
        return "".join(render(c, step) for c in node.children)

    return [(end, render(tree, end)) for end in sorted(ends)]


@settings(max_examples=400, derandomize=True, deadline=None)
@given(st.text(alphabet="ab [](): |\\0.5-2e", min_size=1, max_size=16), st.integers(1, 12))
def test_schedules_equal_a1111_grammar(prompt, steps):
    assert prompt_schedule(prompt, steps) == _a1111_schedule(prompt, steps)
