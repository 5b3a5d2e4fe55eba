"""A1111's prompt editing, alternation and composable `AND`, written independently after A1111 >= 1.6.

- `[a:b:when]` renders `a` up to step `when` and `b` after it; `[a:when]` adds `a` after `when`, `[a::when]` drops
  it there. `when` with a `.` is a fraction of the steps, otherwise a step number (`[a:b:0.0]` is `b`
  throughout, `[a:b:1.0]` is `a`). Steps count from 1; second-order samplers count model calls, over twice the
  steps, as A1111 does.
- `[a|b|c]` switches option at every step (step 1 `a`, step 2 `b`, ...); options may be empty (`[fe|]male`).
- `a AND b:0.5` splits the prompt into sub-prompts (`AND` as a word), each with an optional `:weight` at its end;
  their predictions are combined as A1111 does (uncond + sum of weight x scale x (cond - uncond)).

The grammar is A1111's: brackets inside an edit or alternation must balance; at the top level a bracket that
opens nothing is plain text. Text A1111's grammar cannot read at all (a `|` outside `[...]`, a backslash at the
end) is used literally at every step, as A1111 does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mergekit_sdxl.errors import PromptError

_AND = re.compile(r"\bAND\b")
_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")
# `[ WHITESPACE ] NUMBER [ WHITESPACE ] "]"` after the last colon (lark's SIGNED_NUMBER)
_WHEN = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?))\s*\]")
_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")  # text, with any escaped character but a newline


@dataclass
class _Edit:
    before: list | None
    after: list
    when: str  # as written: a step number, or a fraction of the steps
    at: int  # position of the `[` in the prompt
    step: int = 0  # `when` as a step, set by `_resolve`


@dataclass
class _Alternate:
    options: list[list]


class _NoMatch(Exception):
    """The bracket at this position opens no construct."""


class _Unreadable(Exception):
    """A1111's grammar cannot read the prompt (it then uses the text as it is)."""


class _Parser:
    def __init__(self, text: str) -> None:
        self.text, self.n = text, len(text)

    def top(self) -> list:
        items: list = []
        i = 0
        while i < self.n:
            c = self.text[i]
            if c in "([":
                try:
                    parsed, i = self.bracket(i)
                    items += parsed
                    continue
                except _NoMatch:
                    pass
            if c in "()[]:":
                items.append(c)
                i += 1
                continue
            i = self.plain(i, items, top=True)
        return items

    def plain(self, i: int, items: list, top: bool) -> int:
        match = _PLAIN.match(self.text, i)
        if match is None:  # `|` or a backslash with nothing (or a newline) after it
            if top:
                raise _Unreadable
            raise _NoMatch
        items.append(match.group(0))
        return match.end()

    def prompt(self, i: int) -> tuple[list, int]:
        items: list = []
        while i < self.n and self.text[i] not in ")]:|":
            if self.text[i] in "([":
                parsed, i = self.bracket(i)
                items += parsed
            else:
                i = self.plain(i, items, top=False)
        return items, i

    def expect(self, i: int, chars: str) -> str:
        if i >= self.n or self.text[i] not in chars:
            raise _NoMatch
        return self.text[i]

    def bracket(self, i: int) -> tuple[list, int]:
        if self.text[i] == "(":
            inner, j = self.prompt(i + 1)
            if self.expect(j, "):") == ")":
                return ["(", *inner, ")"], j + 1
            second, k = self.prompt(j + 1)
            self.expect(k, ")")
            return ["(", *inner, ":", *second, ")"], k + 1
        first, j = self.prompt(i + 1)
        kind = self.expect(j, "]|:")
        if kind == "]":
            return ["[", *first, "]"], j + 1
        if kind == "|":
            options = [first]
            while j < self.n and self.text[j] == "|":
                option, j = self.prompt(j + 1)
                options.append(option)
            self.expect(j, "]")
            return [_Alternate(options)], j + 1
        when = _WHEN.match(self.text, j + 1)
        if when:
            return [_Edit(None, first, when.group(1), i)], when.end()
        second, k = self.prompt(j + 1)
        self.expect(k, ":")
        when = _WHEN.match(self.text, k + 1)
        if when is None:
            raise _NoMatch
        return [_Edit(first, second, when.group(1), i)], when.end()


def _resolve(items: list, steps: int, prompt: str) -> tuple[set[int], bool]:
    """The steps at which the text changes, and whether an alternation is present; fixes each edit's step."""
    changes: set[int] = set()
    alternating = False
    for item in items:
        if isinstance(item, _Edit):
            value = float(item.when)
            value = value * steps if "." in item.when else value
            try:
                item.step = min(steps, int(value))
            except OverflowError:
                raise PromptError(f"prompt {prompt!r}: step {item.when!r} at character {item.at} is out of "
                                  "range") from None
            if item.step >= 1:
                changes.add(item.step)
            for part in (item.before or [], item.after):
                sub, alt = _resolve(part, steps, prompt)
                changes |= sub
                alternating |= alt
        elif isinstance(item, _Alternate):
            alternating = True
            for option in item.options:
                changes |= _resolve(option, steps, prompt)[0]
    return changes, alternating


def _render(items: list, step: int) -> str:
    out = []
    for item in items:
        if isinstance(item, _Edit):
            out.append(_render(item.before or [], step) if step <= item.step else _render(item.after, step))
        elif isinstance(item, _Alternate):
            out.append(_render(item.options[(step - 1) % len(item.options)], step))
        else:
            out.append(item)
    return "".join(out)


def prompt_schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """[(last step, text), ...]: the text of `prompt` up to each step at which it changes (A1111's schedule)."""
    try:
        items = _Parser(prompt).top()
    except _Unreadable:
        return [(steps, prompt)]
    changes, alternating = _resolve(items, steps, prompt)
    ends = sorted({steps, *changes, *(range(1, steps + 1) if alternating else ())})
    return [(end, _render(items, end)) for end in ends]


def split_and(prompt: str) -> list[tuple[str, float]]:
    """Composable sub-prompts: `a AND b:0.5` -> [("a", 1.0), ("b", 0.5)] (A1111's `AND` and weight rules)."""
    out = []
    for part in _AND.split(prompt):
        match = _WEIGHT.search(part)
        text, weight = match.groups() if match is not None else (part, None)
        out.append((text, float(weight) if weight is not None else 1.0))
    return out


def text_at(schedule: list[tuple[int, str]], call: int) -> str:
    """The text in force at model call `call` (0-based), as A1111's `reconstruct_cond_batch` picks it: the first
    entry whose last step is >= call, or the first entry when calls run past the schedule."""
    return next((text for end, text in schedule if call <= end), schedule[0][1])


def check_prompt(prompt: str, steps: int, negative: bool = False) -> None:
    """PromptError for anything in `prompt` A1111 would reject, before any model is loaded."""
    from mergekit_sdxl.sampler.prompt import parse_prompt_attention
    from mergekit_sdxl.sampler.prompt_loras import extract_lora_tags

    text = prompt if negative else extract_lora_tags(prompt)[0]
    for part, _weight in ([(text, 1.0)] if negative else split_and(text)):
        for _end, rendered in prompt_schedule(part, steps):
            parse_prompt_attention(rendered)
