"""A corpus of broken inputs, generated (never downloaded), each with the exact CLI failure it must produce.

Every case is a small builder registered with `@case(name)`: given a `Ctx` (a scratch folder and two valid tiny
checkpoints), it writes its broken file(s) and returns a `Case`: the `mergekit-sdxl` arguments to run, the exit code
the README documents for it, the substrings the one-line stderr message must contain (file, key, step), the files
that must be unchanged afterwards, the output that must not exist, and for code-injection cases a marker file whose
existence would prove the injected code ran. tests/test_hardening_corpus.py runs them all.

Run `python tests/broken_corpus.py` to run the hardening tests and print the counts for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

# exit codes (README "Exit codes")
USAGE, RECIPE, CHECKPOINT, OUTPUT = 2, 3, 4, 6


@dataclass(frozen=True)
class Ctx:
    """Where a case writes, and two valid tiny checkpoints it may use (read-only)."""

    root: Path
    sdxl: Path
    sd15: Path


@dataclass(frozen=True)
class Case:
    """One broken input and the failure the CLI must report for it."""

    name: str
    argv: tuple[str, ...]
    code: int
    needles: tuple[str, ...]
    inputs: tuple[Path, ...] = ()
    output: Path | None = None
    marker: Path | None = None
    subprocess: bool = False  # historical: every case now runs in a forked child with a timeout
    denied: Path | None = None  # the test makes opening this path raise PermissionError (we run as root)
    creates: Path | None = None  # exit-0 cases: the output that must appear
    folder: Path | None = None  # the case's scratch folder: it must hold the same files afterwards (set by build)
    new: bool = False  # added in the hardening round of issue 10 (counted in benchmarks/RESULTS.md)
    promise: str = ""  # for new cases: the issue-10 class of broken promise it guards (CLASSES)


Builder = Callable[[Ctx], list[Case]]
BUILDERS: dict[str, Builder] = {}
# the classes of broken promise issue 10 found; each case added in that round names the one it guards
CLASSES = ("data loss", "hang or runaway memory", "internal error")
NEW: dict[str, str] = {}  # builder name -> its class


def case(name: str, new: str = "") -> Callable[[Builder], Builder]:
    """Register a builder; it returns one Case per command the broken input is run through. `new`: the class
    (one of CLASSES) of a case added in the hardening round of issue 10."""
    if new and new not in CLASSES:
        raise ValueError(f"{name}: unknown class {new!r}")

    def register(fn: Builder) -> Builder:
        BUILDERS[name] = fn
        if new:
            NEW[name] = new
        return fn

    return register


# ------------------------------------------------------------------------------------------------ file helpers

GOOD_HEADER = {
    "__metadata__": {"format": "pt"},
    "w": {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 8]},
    "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
}
GOOD_DATA = bytes(range(16))


def st_bytes(header: dict | bytes, data: bytes = GOOD_DATA, length: int | None = None) -> bytes:
    """A safetensors file from a header (dict or raw JSON bytes) and data; `length` overrides the length field."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def header_with(**entries: object) -> dict:
    """GOOD_HEADER with some entries replaced (None removes one)."""
    out = json.loads(json.dumps(GOOD_HEADER))
    for key, value in entries.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def recipe_text(a: str, b: str, alpha: object = 0.5, out: str = "merged.safetensors") -> str:
    """A two-model weighted_sum recipe."""
    return json.dumps({"models": {"a": a, "b": b},
                       "steps": {"output": {"method": "weighted_sum", "a": "a", "b": "b", "alpha": alpha}},
                       "output": {"path": out, "dtype": "fp16"}})


def checkpoint_cases(ctx: Ctx, name: str, filename: str, content: bytes | None, code: int,
                     needles: tuple[str, ...], *, subprocess_: bool = False, denied: bool = False,
                     commands: tuple[str, ...] = ("inspect", "convert", "merge")) -> list[Case]:
    """A broken checkpoint run through inspect, convert and merge (as model `b` beside a valid SDXL `a`)."""
    folder = ctx.root / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / filename
    if content is not None:
        path.write_bytes(content)
    out = folder / "out.safetensors"
    cases = []
    kw = {"subprocess": subprocess_, "denied": path if denied else None}
    inputs = (path,) if path.is_file() and not denied else ()
    if "inspect" in commands:
        cases.append(Case(f"{name}/inspect", ("inspect", str(path)), code, (filename, *needles), inputs, **kw))
    if "hash" in commands:
        cases.append(Case(f"{name}/hash", ("hash", str(path)), code, (filename, *needles), inputs, **kw))
    if "convert" in commands:
        cases.append(Case(f"{name}/convert", ("convert", str(path), str(out), "--dtype", "fp16"), code,
                          (filename, *needles), inputs, out, **kw))
    if "merge" in commands:
        recipe = folder / "recipe.yaml"
        recipe.write_text(recipe_text(str(ctx.sdxl), str(path)))
        cases.append(Case(f"{name}/merge", ("merge", str(recipe), "-o", str(out)), code,
                          ("'b'", filename, *needles) if code == CHECKPOINT and not denied else (filename, *needles),
                          (*inputs, ctx.sdxl, recipe), out, **kw))
    return cases


def recipe_case(ctx: Ctx, name: str, text: str | bytes, code: int, needles: tuple[str, ...],
                marker: Path | None = None, extra: tuple[str, ...] = ()) -> list[Case]:
    """A broken recipe run through `merge` (and `merge --dry-run`)."""
    folder = ctx.root / name
    folder.mkdir(parents=True, exist_ok=True)
    recipe = folder / "recipe.yaml"
    recipe.write_bytes(text.encode() if isinstance(text, str) else text)
    out = folder / "out.safetensors"
    inputs = (recipe, ctx.sdxl, ctx.sd15)
    return [Case(f"{name}/merge", ("merge", str(recipe), "-o", str(out), *extra), code, ("recipe.yaml", *needles),
                 inputs, out, marker),
            Case(f"{name}/dry-run", ("merge", str(recipe), "-o", str(out), "--dry-run", *extra), code,
                 ("recipe.yaml", *needles), inputs, out, marker)]


def patch_tensor(src: Path, dst: Path, key: str, value: float) -> None:
    """Copy a safetensors file, setting every element of `key` to `value` (in its stored dtype)."""
    from mergekit_sdxl.io.reader import SafetensorsReader

    shutil.copyfile(src, dst)
    with SafetensorsReader(dst) as reader:
        info = reader.info(key)
        tensor = torch.full(info.shape, value, dtype=reader.read(key).dtype)
    with open(dst, "r+b") as f:
        f.seek(info.start)
        f.write(tensor.contiguous().view(torch.uint8).numpy().tobytes())


def first_unet_bias(path: Path) -> str:
    """A float UNet key of a tiny checkpoint (where a NaN is planted)."""
    from mergekit_sdxl.io.reader import SafetensorsReader

    with SafetensorsReader(path) as reader:
        return next(k for k in reader.keys() if k.startswith("model.diffusion_model.") and k.endswith(".bias"))


class Payload:
    """Unpickling this runs code (creates a marker file): it must never be unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def torch_zip_declaring(path: Path, numel: int, member_bytes: int = 64) -> None:
    """A torch zip checkpoint whose pickle declares a float32 storage of `numel` elements, with a small member."""
    torch.save({"w": torch.zeros(16)}, path)
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    pkl_name = next(n for n in members if n.endswith("data.pkl"))
    data_name = next(n for n in members if "/data/" in n)
    pkl = members[pkl_name]
    # the storage size 16 and the tensor size (16,) are pickled as BININT1 16 (K\x10): make them huge
    pkl = pkl.replace(b"K\x10", b"J" + struct.pack("<i", min(numel, 2**31 - 1)))
    members[pkl_name] = pkl
    members[data_name] = b"\0" * member_bytes
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for n, blob in members.items():
            z.writestr(n, blob)


def torch_zip_bomb(path: Path, member_size: int) -> None:
    """A torch zip checkpoint whose one tensor is `member_size` bytes of zeros stored deflated (a zip bomb: a few
    hundred KB on disk that inflate to `member_size`); the pickle declares the matching float32 storage."""
    numel = member_size // 4
    torch.save({"w": torch.zeros(16)}, path)
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    pkl_name = next(n for n in members if n.endswith("data.pkl"))
    data_name = next(n for n in members if "/data/" in n)
    members[pkl_name] = members[pkl_name].replace(b"K\x10", b"J" + struct.pack("<i", numel))
    chunk = b"\0" * (8 << 20)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for n, blob in members.items():
            if n != data_name:
                z.writestr(n, blob)
                continue
            info = zipfile.ZipInfo(n)
            info.compress_type = zipfile.ZIP_DEFLATED
            with z.open(info, "w", force_zip64=True) as f:
                for _ in range(member_size // len(chunk)):
                    f.write(chunk)


# ------------------------------------------------------------------------------------------------ safetensors


@case("st-truncated-in-header")
def _(ctx: Ctx) -> list[Case]:
    good = st_bytes(GOOD_HEADER)
    return checkpoint_cases(ctx, "st-truncated-in-header", "cut.safetensors", good[:40], CHECKPOINT,
                            ("runs past the end",))


@case("st-truncated-in-data")
def _(ctx: Ctx) -> list[Case]:
    good = st_bytes(GOOD_HEADER)
    return checkpoint_cases(ctx, "st-truncated-in-data", "cut.safetensors", good[:-5], CHECKPOINT,
                            ("'b'", "outside the data region"))


@case("st-header-length-beyond-file")
def _(ctx: Ctx) -> list[Case]:
    content = st_bytes(GOOD_HEADER, length=4096)
    return checkpoint_cases(ctx, "st-header-length-beyond-file", "long.safetensors", content, CHECKPOINT,
                            ("header length 4096 runs past the end",))


@case("st-header-length-absurd")
def _(ctx: Ctx) -> list[Case]:
    content = st_bytes(GOOD_HEADER, length=2**63 - 1)
    return checkpoint_cases(ctx, "st-header-length-absurd", "absurd.safetensors", content, CHECKPOINT,
                            ("exceeds the 104857600-byte limit",))


@case("st-header-length-200mb")
def _(ctx: Ctx) -> list[Case]:
    content = st_bytes(GOOD_HEADER, length=200 << 20)
    return checkpoint_cases(ctx, "st-header-length-200mb", "big.safetensors", content, CHECKPOINT,
                            ("exceeds the 104857600-byte limit",))


@case("st-invalid-json")
def _(ctx: Ctx) -> list[Case]:
    content = st_bytes(b'{"w": {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 8]', b"")
    return checkpoint_cases(ctx, "st-invalid-json", "json.safetensors", content, CHECKPOINT,
                            ("not valid JSON",))


@case("st-invalid-utf8")
def _(ctx: Ctx) -> list[Case]:
    content = st_bytes(b'{"w\xff\xfe": 1}', b"")
    return checkpoint_cases(ctx, "st-invalid-utf8", "utf8.safetensors", content, CHECKPOINT, ("not valid UTF-8",))


@case("st-header-not-object")
def _(ctx: Ctx) -> list[Case]:
    content = st_bytes(b"[1, 2, 3]", b"")
    return checkpoint_cases(ctx, "st-header-not-object", "list.safetensors", content, CHECKPOINT,
                            ("not a JSON object",))


@case("st-unknown-dtype")
def _(ctx: Ctx) -> list[Case]:
    content = st_bytes(header_with(w={"dtype": "F17", "shape": [2, 2], "data_offsets": [0, 8]}))
    return checkpoint_cases(ctx, "st-unknown-dtype", "dtype.safetensors", content, CHECKPOINT,
                            ("'w'", "unknown or unsupported dtype 'F17'"))


@case("st-dtype-not-string")
def _(ctx: Ctx) -> list[Case]:
    content = st_bytes(header_with(w={"dtype": 16, "shape": [2, 2], "data_offsets": [0, 8]}))
    return checkpoint_cases(ctx, "st-dtype-not-string", "dtype.safetensors", content, CHECKPOINT,
                            ("'w'", "unknown or unsupported dtype 16"))


@case("st-unsupported-dtype-c64")
def _(ctx: Ctx) -> list[Case]:
    content = st_bytes(header_with(b={"dtype": "C64", "shape": [1], "data_offsets": [8, 16]}))
    return checkpoint_cases(ctx, "st-unsupported-dtype-c64", "c64.safetensors", content, CHECKPOINT,
                            ("'b'", "unknown or unsupported dtype 'C64'"))


@case("st-offsets-out-of-bounds")
def _(ctx: Ctx) -> list[Case]:
    content = st_bytes(header_with(b={"dtype": "F32", "shape": [14], "data_offsets": [8, 64]}))
    return checkpoint_cases(ctx, "st-offsets-out-of-bounds", "oob.safetensors", content, CHECKPOINT,
                            ("'b'", "outside the data region of 16 bytes"))


@case("st-offsets-overlap")
def _(ctx: Ctx) -> list[Case]:
    content = st_bytes(header_with(b={"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}), GOOD_DATA[:12])
    return checkpoint_cases(ctx, "st-offsets-overlap", "overlap.safetensors", content, CHECKPOINT,
                            ("'b'", "overlaps"))


@case("st-offsets-gap")
def _(ctx: Ctx) -> list[Case]:
    content = st_bytes(header_with(b={"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}), bytes(20))
    return checkpoint_cases(ctx, "st-offsets-gap", "gap.safetensors", content, CHECKPOINT,
                            ("'b'", "4 bytes before tensor", "belong to no tensor"))


@case("st-trailing-bytes")
def _(ctx: Ctx) -> list[Case]:
    content = st_bytes(GOOD_HEADER, GOOD_DATA + bytes(8))
    return checkpoint_cases(ctx, "st-trailing-bytes", "trailing.safetensors", content, CHECKPOINT,
                            ("8 bytes at the end of the data belong to no tensor",))


@case("st-shape-dtype-mismatch")
def _(ctx: Ctx) -> list[Case]:
    content = st_bytes(header_with(w={"dtype": "F16", "shape": [3, 2], "data_offsets": [0, 8]}))
    return checkpoint_cases(ctx, "st-shape-dtype-mismatch", "shape.safetensors", content, CHECKPOINT,
                            ("'w'", "8 bytes stored but shape [3, 2] of F16 needs 12"))


@case("st-duplicate-keys")
def _(ctx: Ctx) -> list[Case]:
    raw = (b'{"w": {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 8]}, '
           b'"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}')
    return checkpoint_cases(ctx, "st-duplicate-keys", "dup.safetensors", st_bytes(raw), CHECKPOINT,
                            ("duplicate key 'w'",))


@case("st-huge-tensor-tiny-file")
def _(ctx: Ctx) -> list[Case]:
    content = st_bytes(header_with(w={"dtype": "F32", "shape": [1_000_000, 1_000_000], "data_offsets": [0, 8]}))
    return checkpoint_cases(ctx, "st-huge-tensor-tiny-file", "huge.safetensors", content, CHECKPOINT,
                            ("'w'", "needs 4000000000000"))


@case("st-negative-shape")
def _(ctx: Ctx) -> list[Case]:
    content = st_bytes(header_with(w={"dtype": "F16", "shape": [-2, -2], "data_offsets": [0, 8]}))
    return checkpoint_cases(ctx, "st-negative-shape", "neg.safetensors", content, CHECKPOINT,
                            ("'w'", "shape must be a list of non-negative integers"))


@case("st-float-offsets")
def _(ctx: Ctx) -> list[Case]:
    content = st_bytes(header_with(w={"dtype": "F16", "shape": [2, 2], "data_offsets": [0.0, 8.0]}))
    return checkpoint_cases(ctx, "st-float-offsets", "floatoff.safetensors", content, CHECKPOINT,
                            ("'w'", "data_offsets must be two integers"))


@case("st-metadata-not-strings")
def _(ctx: Ctx) -> list[Case]:
    content = st_bytes(header_with(__metadata__={"epochs": 3}))
    return checkpoint_cases(ctx, "st-metadata-not-strings", "meta.safetensors", content, CHECKPOINT,
                            ("__metadata__ value of 'epochs' is int",))


@case("empty-file")
def _(ctx: Ctx) -> list[Case]:
    return checkpoint_cases(ctx, "empty-file", "empty.safetensors", b"", CHECKPOINT,
                            ("only 0 bytes, too short",))


@case("seven-bytes")
def _(ctx: Ctx) -> list[Case]:
    return checkpoint_cases(ctx, "seven-bytes", "seven.safetensors", b"\x10" * 7, CHECKPOINT,
                            ("only 7 bytes, too short",))


@case("garbage-ckpt")
def _(ctx: Ctx) -> list[Case]:
    return checkpoint_cases(ctx, "garbage-ckpt", "garbage.ckpt", b"GIF89a" + bytes(range(256)) * 4, CHECKPOINT,
                            ("unrecognised first bytes",))


@case("directory")
def _(ctx: Ctx) -> list[Case]:
    folder = ctx.root / "directory"
    (folder / "model.safetensors").mkdir(parents=True, exist_ok=True)
    cases = checkpoint_cases(ctx, "directory", "model.safetensors", None, CHECKPOINT, ("not a diffusers folder",))
    path = folder / "model.safetensors"
    cases.append(Case("directory/hash", ("hash", str(path)), USAGE, ("model.safetensors", "is a directory")))
    return cases


@case("fifo")
def _(ctx: Ctx) -> list[Case]:
    folder = ctx.root / "fifo"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pipe.safetensors"
    if not path.exists():
        os.mkfifo(path)
    cases = checkpoint_cases(ctx, "fifo", "pipe.safetensors", None, CHECKPOINT, ("is a FIFO",),
                             subprocess_=True)
    cases.append(Case("fifo/hash", ("hash", str(path)), CHECKPOINT, ("pipe.safetensors", "not a regular file"),
                      subprocess=True))
    recipe = folder / "pipe-recipe.yaml"
    if not recipe.exists():
        os.mkfifo(recipe)
    cases.append(Case("fifo/recipe", ("merge", str(recipe), "-o", str(folder / "out.safetensors")), RECIPE,
                      ("pipe-recipe.yaml", "not a regular file"), output=folder / "out.safetensors", subprocess=True))
    return cases


@case("unreadable")
def _(ctx: Ctx) -> list[Case]:
    content = st_bytes(GOOD_HEADER)
    return checkpoint_cases(ctx, "unreadable", "locked.safetensors", content, CHECKPOINT,
                            ("Permission denied",), denied=True,
                            commands=("inspect", "hash", "convert", "merge"))


@case("nan-tensor")
def _(ctx: Ctx) -> list[Case]:
    return _non_finite(ctx, "nan-tensor", float("nan"))


@case("inf-tensor")
def _(ctx: Ctx) -> list[Case]:
    return _non_finite(ctx, "inf-tensor", float("inf"))


def _non_finite(ctx: Ctx, name: str, value: float) -> list[Case]:
    folder = ctx.root / name
    folder.mkdir(parents=True, exist_ok=True)
    bad = folder / "bad.safetensors"
    key = first_unet_bias(ctx.sdxl)
    patch_tensor(ctx.sdxl, bad, key, value)
    recipe = folder / "recipe.yaml"
    recipe.write_text(recipe_text(str(ctx.sdxl), str(bad)))
    out = folder / "out.safetensors"
    return [Case(f"{name}/merge", ("merge", str(recipe), "-o", str(out), "--no-input-hashes"), CHECKPOINT,
                 (key,), (bad, ctx.sdxl, recipe), out)]


# ------------------------------------------------------------------------------------------------ pickles


@case("pickle-code-zip")
def _(ctx: Ctx) -> list[Case]:
    folder = ctx.root / "pickle-code-zip"
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / "PWNED"
    path = folder / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "x": Payload(str(marker))}, path)
    cases = checkpoint_cases(ctx, "pickle-code-zip", "evil.ckpt", None, CHECKPOINT, ("refused",))
    return [Case(c.name, c.argv, c.code, c.needles, c.inputs, c.output, marker) for c in cases]


@case("pickle-code-legacy")
def _(ctx: Ctx) -> list[Case]:
    folder = ctx.root / "pickle-code-legacy"
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / "PWNED"
    path = folder / "evil.pt"
    path.write_bytes(pickle.dumps({"w": Payload(str(marker))}, protocol=2))
    cases = checkpoint_cases(ctx, "pickle-code-legacy", "evil.pt", None, CHECKPOINT, ("refused",))
    return [Case(c.name, c.argv, c.code, c.needles, c.inputs, c.output, marker) for c in cases]


@case("ckpt-declares-huge-storage")
def _(ctx: Ctx) -> list[Case]:
    folder = ctx.root / "ckpt-declares-huge-storage"
    folder.mkdir(parents=True, exist_ok=True)
    torch_zip_declaring(folder / "huge.ckpt", 2**31 - 1)
    return checkpoint_cases(ctx, "ckpt-declares-huge-storage", "huge.ckpt", None, CHECKPOINT,
                            ("declares a 8589934588-byte storage", "holds 64 bytes"))


# ------------------------------------------------------------------------------------------------ recipes


def _two(ctx: Ctx, steps: object, **top: object) -> str:
    return json.dumps({"models": {"a": str(ctx.sdxl), "b": str(ctx.sdxl)}, "steps": steps, **top})


@case("yaml-billion-laughs")
def _(ctx: Ctx) -> list[Case]:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},"
              f"*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)}]" for i in range(8)]
    return recipe_case(ctx, "yaml-billion-laughs", "\n".join(lines) + "\n", RECIPE, ("anchors and aliases",))


@case("yaml-alias-in-steps")
def _(ctx: Ctx) -> list[Case]:
    text = (f"models: {{a: {ctx.sdxl}, b: {ctx.sdxl}}}\nsteps:\n  s1: &x {{method: weighted_sum, a: a, b: b, "
            "alpha: 0.5}\n  output: *x\n")
    return recipe_case(ctx, "yaml-alias-in-steps", text, RECIPE, (":3", "anchors and aliases"))


@case("yaml-python-tag")
def _(ctx: Ctx) -> list[Case]:
    marker = ctx.root / "yaml-python-tag" / "PWNED"
    text = f"models: !!python/object/apply:os.system ['touch {marker}']\nsteps: {{}}\n"
    return recipe_case(ctx, "yaml-python-tag", text, RECIPE, ("invalid YAML",), marker)


@case("recipe-unknown-top-field")
def _(ctx: Ctx) -> list[Case]:
    text = _two(ctx, {"output": "a + 0.5 * (b - a)"}, exec="rm -rf /")
    return recipe_case(ctx, "recipe-unknown-top-field", text, RECIPE, ("unknown field 'exec'",))


@case("recipe-unknown-step-field")
def _(ctx: Ctx) -> list[Case]:
    text = _two(ctx, {"output": {"method": "weighted_sum", "a": "a", "b": "b", "alpha": 0.5, "beta": 1}})
    return recipe_case(ctx, "recipe-unknown-step-field", text, RECIPE, ("steps.output", "unknown field 'beta'"))


@case("recipe-wrong-type")
def _(ctx: Ctx) -> list[Case]:
    text = _two(ctx, {"output": {"method": "weighted_sum", "a": "a", "b": "b", "alpha": True}})
    return recipe_case(ctx, "recipe-wrong-type", text, RECIPE, ("steps.output.alpha", "expected a number"))


@case("recipe-models-not-mapping")
def _(ctx: Ctx) -> list[Case]:
    text = json.dumps({"models": [str(ctx.sdxl)], "steps": {"output": "a"}})
    return recipe_case(ctx, "recipe-models-not-mapping", text, RECIPE, ("models", "expected a mapping"))


@case("recipe-cycle")
def _(ctx: Ctx) -> list[Case]:
    text = _two(ctx, {"s1": "s2 + 0.5 * (b - a)", "s2": "s1 + 0.5 * (b - a)", "output": "s2"})
    return recipe_case(ctx, "recipe-cycle", text, RECIPE, ("steps", "cycle", "s1 -> s2 -> s1"))


@case("recipe-self-reference")
def _(ctx: Ctx) -> list[Case]:
    text = _two(ctx, {"output": {"method": "weighted_sum", "a": "output", "b": "b", "alpha": 0.5}})
    return recipe_case(ctx, "recipe-self-reference", text, RECIPE, ("steps.output.a", "refers to itself"))


@case("recipe-huge-vector")
def _(ctx: Ctx) -> list[Case]:
    text = _two(ctx, {"output": {"method": "weighted_sum", "a": "a", "b": "b", "alpha": [0.5] * 5000}})
    return recipe_case(ctx, "recipe-huge-vector", text, RECIPE, ("steps.output.alpha", "5000 values"))


@case("recipe-too-many-values")
def _(ctx: Ctx) -> list[Case]:
    return recipe_case(ctx, "recipe-too-many-values", "[" + "0," * 60_000 + "0]\n", RECIPE,
                       ("more than 50000 YAML values",))


@case("recipe-wrong-vector-length")
def _(ctx: Ctx) -> list[Case]:
    text = _two(ctx, {"output": {"method": "weighted_sum", "a": "a", "b": "b", "alpha": [0.5] * 7}})
    return recipe_case(ctx, "recipe-wrong-vector-length", text, RECIPE, ("steps.output.alpha",))


@case("recipe-formula-python")
def _(ctx: Ctx) -> list[Case]:
    marker = ctx.root / "recipe-formula-python" / "PWNED"
    text = _two(ctx, {"output": f"a + 0.5 * (b - a) + 0 * __import__('os').system('touch {marker}')"})
    return recipe_case(ctx, "recipe-formula-python", text, RECIPE, ("steps.output.formula", "unexpected \"'\""),
                       marker)


@case("recipe-formula-eval")
def _(ctx: Ctx) -> list[Case]:
    marker = ctx.root / "recipe-formula-eval" / "PWNED"
    text = _two(ctx, {"output": f"eval(\"open('{marker}', 'w')\")"})
    return recipe_case(ctx, "recipe-formula-eval", text, RECIPE, ("steps.output.formula",), marker)


@case("recipe-formula-unknown-name")
def _(ctx: Ctx) -> list[Case]:
    text = _two(ctx, {"output": "a + 0.5 * (b - c)"})
    return recipe_case(ctx, "recipe-formula-unknown-name", text, RECIPE, ("steps.output.formula", "'c'"))


@case("recipe-formula-adds-models")
def _(ctx: Ctx) -> list[Case]:
    text = _two(ctx, {"output": "a + b"})
    return recipe_case(ctx, "recipe-formula-adds-models", text, RECIPE, ("steps.output.formula", "adds models"))


@case("recipe-output-path-dotdot")
def _(ctx: Ctx) -> list[Case]:
    folder = ctx.root / "recipe-output-path-dotdot"
    text = _two(ctx, {"output": "a + 0.5 * (b - a)"}, output={"path": "../../escaped.safetensors"})
    cases = recipe_case(ctx, "recipe-output-path-dotdot", text, RECIPE, ("output.path", "'..'"))
    # run without -o so output.path is the one used
    return [Case(c.name, tuple(a for a in c.argv if a not in ("-o", str(folder / "out.safetensors"))), c.code,
                 c.needles, c.inputs, folder.parent.parent / "escaped.safetensors") for c in cases]


@case("recipe-model-path-dotdot")
def _(ctx: Ctx) -> list[Case]:
    text = json.dumps({"models": {"a": str(ctx.sdxl), "b": "../../../nowhere/../b.safetensors"},
                       "steps": {"output": "a + 0.5 * (b - a)"}})
    cases = recipe_case(ctx, "recipe-model-path-dotdot", text, CHECKPOINT, ("model 'b'", "no such file"))
    return [Case(c.name, c.argv, c.code, ("b.safetensors", *c.needles[1:]), c.inputs, c.output) for c in cases]


@case("recipe-mixed-sd15-sdxl")
def _(ctx: Ctx) -> list[Case]:
    text = json.dumps({"models": {"a": str(ctx.sdxl), "b": str(ctx.sd15)}, "steps": {"output": "a + 0.5 * (b - a)"}})
    return recipe_case(ctx, "recipe-mixed-sd15-sdxl", text, CHECKPOINT, ("sd15", "sdxl"))


@case("recipe-not-utf8")
def _(ctx: Ctx) -> list[Case]:
    return recipe_case(ctx, "recipe-not-utf8", b"models:\n  a: \xff\xfe\n", RECIPE, ("not UTF-8",))


@case("recipe-too-large")
def _(ctx: Ctx) -> list[Case]:
    return recipe_case(ctx, "recipe-too-large", "# " + "x" * (2 << 20) + "\n", RECIPE, ("larger than",))


@case("recipe-deep-nesting")
def _(ctx: Ctx) -> list[Case]:
    return recipe_case(ctx, "recipe-deep-nesting", "a: " + "[" * 5000 + "]" * 5000 + "\n", RECIPE,
                       ("nests deeper",))


@case("recipe-empty")
def _(ctx: Ctx) -> list[Case]:
    return recipe_case(ctx, "recipe-empty", "", RECIPE, ("recipe is empty",))


@case("recipe-missing-file")
def _(ctx: Ctx) -> list[Case]:
    folder = ctx.root / "recipe-missing-file"
    folder.mkdir(parents=True, exist_ok=True)
    return [Case("recipe-missing-file/merge", ("merge", str(folder / "recipe.yaml"), "-o", str(folder / "o")),
                 RECIPE, ("recipe.yaml", "cannot read recipe"), output=folder / "o")]


# ------------------------------------------------------------------------------------------------ outputs, usage


@case("out-is-input")
def _(ctx: Ctx) -> list[Case]:
    folder = ctx.root / "out-is-input"
    folder.mkdir(parents=True, exist_ok=True)
    a = folder / "a.safetensors"
    if not a.exists():
        shutil.copyfile(ctx.sdxl, a)
    recipe = folder / "recipe.yaml"
    recipe.write_text(recipe_text(str(a), str(ctx.sdxl)))
    return [Case("out-is-input/merge", ("merge", str(recipe), "-o", str(a), "--overwrite"), OUTPUT,
                 ("a.safetensors", "is one of the inputs"), (a, ctx.sdxl, recipe)),
            Case("out-is-input/convert", ("convert", str(a), str(a), "--dtype", "fp32", "--overwrite"), OUTPUT,
                 ("a.safetensors", "is one of the inputs"), (a,))]


@case("out-exists")
def _(ctx: Ctx) -> list[Case]:
    folder = ctx.root / "out-exists"
    folder.mkdir(parents=True, exist_ok=True)
    existing = folder / "existing.safetensors"
    existing.write_bytes(b"precious")
    recipe = folder / "recipe.yaml"
    recipe.write_text(recipe_text(str(ctx.sdxl), str(ctx.sdxl)))
    return [Case("out-exists/merge", ("merge", str(recipe), "-o", str(existing)), OUTPUT,
                 ("existing.safetensors", "--overwrite"), (existing, ctx.sdxl, recipe)),
            Case("out-exists/convert", ("convert", str(ctx.sdxl), str(existing), "--dtype", "fp32"), OUTPUT,
                 ("existing.safetensors", "--overwrite"), (existing, ctx.sdxl))]


@case("out-folder-missing")
def _(ctx: Ctx) -> list[Case]:
    folder = ctx.root / "out-folder-missing"
    folder.mkdir(parents=True, exist_ok=True)
    recipe = folder / "recipe.yaml"
    recipe.write_text(recipe_text(str(ctx.sdxl), str(ctx.sdxl)))
    out = folder / "no" / "such" / "out.safetensors"
    return [Case("out-folder-missing/merge", ("merge", str(recipe), "-o", str(out)), OUTPUT,
                 ("such", "does not exist"), (ctx.sdxl, recipe), out)]


@case("usage-bad-dtype")
def _(ctx: Ctx) -> list[Case]:
    folder = ctx.root / "usage-bad-dtype"
    folder.mkdir(parents=True, exist_ok=True)
    recipe = folder / "recipe.yaml"
    recipe.write_text(recipe_text(str(ctx.sdxl), str(ctx.sdxl)))
    out = folder / "out.safetensors"
    return [Case("usage-bad-dtype/merge", ("merge", str(recipe), "-o", str(out), "--dtype", "fp99"), USAGE,
                 ("fp99",), (ctx.sdxl, recipe), out),
            Case("usage-bad-dtype/convert", ("convert", str(ctx.sdxl), str(out), "--dtype", "fp99"), USAGE,
                 ("fp99",), (ctx.sdxl,), out)]


@case("usage-bad-model-override")
def _(ctx: Ctx) -> list[Case]:
    folder = ctx.root / "usage-bad-model-override"
    folder.mkdir(parents=True, exist_ok=True)
    recipe = folder / "recipe.yaml"
    recipe.write_text(recipe_text(str(ctx.sdxl), str(ctx.sdxl)))
    out = folder / "out.safetensors"
    return [Case("usage-bad-model-override/merge", ("merge", str(recipe), "-o", str(out), "-m", "nonsense"), USAGE,
                 ("nonsense", "ALIAS=PATH"), (ctx.sdxl, recipe), out)]


def record(kind: str, name: str, passed: bool, **extra: object) -> None:
    """Append a result line for `python tests/broken_corpus.py` (only when HARDENING_REPORT is set)."""
    path = os.environ.get("HARDENING_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"kind": kind, "name": name, "passed": passed, **extra}) + "\n")


def build(ctx: Ctx, names: list[str] | None = None) -> list[Case]:
    """Write the corpus under ctx.root and return every case (or those of the named builders)."""
    cases = []
    for name in names or list(BUILDERS):
        folder = ctx.root / name
        for c in BUILDERS[name](ctx):
            cases.append(dataclasses.replace(c, folder=c.folder or (folder if folder.is_dir() else None),
                                             new=name in NEW, promise=NEW.get(name, "")))
    return cases


def case_names() -> list[str]:
    """`builder/command` names of every case, without writing anything (for test ids)."""
    return list(BUILDERS)


if __name__ == "__main__":  # the counts for benchmarks/RESULTS.md
    root = Path(__file__).resolve().parents[1]
    report = root / "bench-out" / "hardening-report.json"
    report.parent.mkdir(exist_ok=True)
    report.unlink(missing_ok=True)
    env = {**os.environ, "HARDENING_REPORT": str(report)}
    files = sorted(str(p) for p in (root / "tests").glob("test_hardening_*.py")) + \
        sorted(str(p) for p in (root / "tests").glob("test_safety_*.py")) + \
        sorted(str(p) for p in (root / "tests").glob("test_fuzz_*.py"))
    rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", *files, *sys.argv[1:]],
                         cwd=root, env=env)
    lines = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
    totals: dict[str, object] = {}
    for entry in lines:
        kind = entry["kind"]
        if kind == "fuzz":
            totals.setdefault("fuzz", {})[entry["target"]] = entry["examples"]  # type: ignore[index]
        if "grown_mb" in entry:
            totals.setdefault("peak RSS growth, MB", {})[entry["name"]] = entry["grown_mb"]  # type: ignore[index]
        if kind != "fuzz":
            names = [kind, f"{kind} (new in issue 10)"] if entry.get("new") else [kind]
            if entry.get("promise"):
                names.append(f"{kind} (new in issue 10): {entry['promise']}")
            for name in names:
                tried, passed = totals.get(name, (0, 0))  # type: ignore[misc]
                totals[name] = (tried + 1, passed + int(entry["passed"]))
        if "rss_mb" in entry:
            worst = totals.setdefault("corpus worst case", {"rss_mb": 0.0, "seconds": 0.0})
            worst["rss_mb"] = max(worst["rss_mb"], entry["rss_mb"])  # type: ignore[index]
            worst["seconds"] = max(worst["seconds"], entry["seconds"])  # type: ignore[index]
    totals["pytest exit status (0: every test passed; a failing test records only the cases it reached)"] = rc
    print(json.dumps(totals, indent=2, sort_keys=True))
    sys.exit(rc)

