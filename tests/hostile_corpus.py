"""Hostile and faulty inputs of the issue-10 hardening round, registered into tests/broken_corpus.py's corpus
(`@case(name, new=CLASS)`; tests/test_hardening_corpus.py runs them, each in a forked child with RSS/time limits;
`python tests/broken_corpus.py` counts them by class for benchmarks/RESULTS.md).

Classes: data loss (outputs onto inputs, links, devices, folders holding inputs, outputs inside input folders),
hangs and runaway memory (self-referencing / expanded / sparse / amplified `.ckpt` files, deep JSON everywhere,
huge adapter factors), and internal errors that must be documented ones.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import warnings
import zipfile
from pathlib import Path

import torch
from broken_corpus import (
    CHECKPOINT,
    CLASSES,
    OUTPUT,
    RECIPE,
    Case,
    Ctx,
    case,
    checkpoint_cases,
    recipe_case,
    recipe_text,
    st_bytes,
)

LOSS, HANG, INTERNAL = CLASSES  # data loss, hangs and runaway memory, internal errors instead of documented codes
LINEAR = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"  # 32x32 in the tiny SDXL
LORA = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"


def _folder(ctx: Ctx, name: str) -> Path:
    folder = ctx.root / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _ckpt(ctx: Ctx, name: str, obj: object, needles: tuple[str, ...], zipped: bool = True,
          filename: str = "bad.ckpt") -> list[Case]:
    path = _folder(ctx, name) / filename
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(obj, path, _use_new_zipfile_serialization=zipped)
    return checkpoint_cases(ctx, name, filename, None, CHECKPOINT, needles)


def _rezip(path: Path, edit: dict[str, bytes], compress: set[str] = frozenset()) -> None:
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    for suffix, blob in edit.items():
        members[next(n for n in members if n.endswith(suffix))] = blob
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for n, blob in members.items():
            z.writestr(n, blob, zipfile.ZIP_DEFLATED if any(n.endswith(c) for c in compress) else zipfile.ZIP_STORED)


# ------------------------------------------------------------------------------------------------ .ckpt files


@case("ckpt-self-reference", new=HANG)
def _(ctx: Ctx) -> list[Case]:
    d: dict = {}
    d["state_dict"] = d  # used to loop forever while unwrapping
    return _ckpt(ctx, "ckpt-self-reference", d, ("contains itself",))


@case("ckpt-flat-self-reference", new=HANG)
def _(ctx: Ctx) -> list[Case]:
    d: dict = {"w": torch.ones(2)}
    d["again"] = d
    return _ckpt(ctx, "ckpt-flat-self-reference", d, ("contains itself",))


@case("ckpt-stride0-expanded", new=HANG)
def _(ctx: Ctx) -> list[Case]:
    # 4 bytes stored, 4 GB announced: used to make convert write 1.25 GB at 3.8 GB RSS
    return _ckpt(ctx, "ckpt-stride0-expanded", {"w": torch.ones(1).expand(1 << 30)}, ("'w'", "repeat elements"))


@case("ckpt-legacy-stride0-expanded", new=HANG)
def _(ctx: Ctx) -> list[Case]:
    return _ckpt(ctx, "ckpt-legacy-stride0-expanded", {"w": torch.ones(1).expand(1 << 28)},
                 ("'w'", "repeat elements"), zipped=False, filename="legacy.pt")


@case("ckpt-overlapping-strides", new=HANG)
def _(ctx: Ctx) -> list[Case]:
    t = torch.ones(8000).as_strided((4000, 4000), (1, 1))  # 32 KB stored, 64 MB announced
    return _ckpt(ctx, "ckpt-overlapping-strides", {"w": t}, ("'w'", "repeat elements"))


@case("ckpt-sparse-tensor", new=INTERNAL)
def _(ctx: Ctx) -> list[Case]:
    return _ckpt(ctx, "ckpt-sparse-tensor", {"w": torch.eye(4).to_sparse()}, ("'w'", "sparse_coo tensor"))


@case("ckpt-meta-tensor", new=INTERNAL)
def _(ctx: Ctx) -> list[Case]:
    return _ckpt(ctx, "ckpt-meta-tensor", {"w": torch.ones(1 << 20, device="meta")}, ("'w'", "no stored data"))


@case("ckpt-storage-amplified", new=HANG)
def _(ctx: Ctx) -> list[Case]:
    w = torch.ones(1 << 16)  # 256 KB stored once, referenced by 4000 keys: 1 GB of output
    return _ckpt(ctx, "ckpt-storage-amplified", {f"k{i}": w for i in range(4000)}, ("storage reused",))


@case("ckpt-compressed-member", new=HANG)
def _(ctx: Ctx) -> list[Case]:
    path = _folder(ctx, "ckpt-compressed-member") / "bad.ckpt"
    torch.save({"w": torch.zeros(1 << 16)}, path)
    _rezip(path, {}, compress={"/data/0"})
    return checkpoint_cases(ctx, "ckpt-compressed-member", "bad.ckpt", None, CHECKPOINT, ("is compressed",))


@case("ckpt-big-endian", new=INTERNAL)
def _(ctx: Ctx) -> list[Case]:
    path = _folder(ctx, "ckpt-big-endian") / "bad.ckpt"
    torch.save({"w": torch.ones(2)}, path)
    _rezip(path, {"/byteorder": b"big"})
    return checkpoint_cases(ctx, "ckpt-big-endian", "bad.ckpt", None, CHECKPOINT, ("'big'-endian",))


@case("ckpt-nested-too-deep", new=HANG)
def _(ctx: Ctx) -> list[Case]:
    obj: dict = {"w": torch.ones(1)}
    for _ in range(50):
        obj = {"state_dict": obj}
    return _ckpt(ctx, "ckpt-nested-too-deep", obj, ("nested more than",))


@case("ckpt-storage-offset-past-end", new=INTERNAL)
def _(ctx: Ctx) -> list[Case]:
    path = _folder(ctx, "ckpt-storage-offset-past-end") / "bad.ckpt"
    torch.save({"w": torch.zeros(16)[8:]}, path)  # storage offset 8 pickled as BININT1 8 (K\x08)
    with zipfile.ZipFile(path) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    _rezip(path, {"data.pkl": pkl.replace(b"K\x08", b"K\x0f", 1)})  # offset 15 + 8 elements > 16
    return checkpoint_cases(ctx, "ckpt-storage-offset-past-end", "bad.ckpt", None, CHECKPOINT, ())


# ------------------------------------------------------------------------------------------------ safetensors


def _header(entries: dict) -> dict:
    return {"__metadata__": {"format": "pt"}, **entries}


@case("st-header-deep-nesting", new=INTERNAL)
def _(ctx: Ctx) -> list[Case]:
    raw = b'{"__metadata__": {"x": "1"}, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "z": ' + \
        b"[" * 50_000 + b"]" * 50_000 + b"}}"
    return checkpoint_cases(ctx, "st-header-deep-nesting", "deep.safetensors", st_bytes(raw, bytes(4)), CHECKPOINT,
                            ("nested deeper than 8 levels",))


@case("st-zero-dim-beside-huge", new=INTERNAL)
def _(ctx: Ctx) -> list[Case]:
    content = st_bytes(_header({"w": {"dtype": "F16", "shape": [0, 2**64], "data_offsets": [0, 0]}}), b"")
    return checkpoint_cases(ctx, "st-zero-dim-beside-huge", "huge.safetensors", content, CHECKPOINT,
                            ("'w'", "too large to be a tensor"))


@case("st-too-many-dims", new=INTERNAL)
def _(ctx: Ctx) -> list[Case]:
    content = st_bytes(_header({"w": {"dtype": "F16", "shape": [1] * 40, "data_offsets": [0, 2]}}), b"\0\0")
    return checkpoint_cases(ctx, "st-too-many-dims", "dims.safetensors", content, CHECKPOINT,
                            ("'w'", "too large to be a tensor"))


@case("st-metadata-deep-lineage", new=INTERNAL)
def _(ctx: Ctx) -> list[Case]:
    """A deeply nested sd_merge_models value (a RecursionError once): inspect shows it as text, a merge drops
    that lineage and succeeds."""
    from mergekit_sdxl.io.reader import open_checkpoint
    from mergekit_sdxl.io.writer import save_file

    folder = _folder(ctx, "st-metadata-deep-lineage")
    path = folder / "lineage.safetensors"
    if not path.exists():
        with open_checkpoint(ctx.sdxl) as r:
            tensors = {k: r.read(k) for k in r.keys()}
        deep = "[" * 100_000 + "]" * 100_000
        save_file(tensors, path, {"sd_merge_models": deep, "sd_merge_recipe": deep, "modelspec.title": "x"})
    recipe = folder / "recipe.yaml"
    recipe.write_text(recipe_text(str(path), str(ctx.sdxl)))
    out = folder / "out.safetensors"
    return [Case("st-metadata-deep-lineage/inspect", ("inspect", str(path)), 0, (), (path,)),
            Case("st-metadata-deep-lineage/merge", ("-q", "merge", str(recipe), "-o", str(out), "--no-input-hashes"),
                 0, (), (path, recipe, ctx.sdxl), creates=out)]


# ------------------------------------------------------------------------------------------------ adapters


def _lora_cases(ctx: Ctx, name: str, tensors: dict[str, torch.Tensor], needles: tuple[str, ...],
                metadata: dict[str, str] | None = None) -> list[Case]:
    from mergekit_sdxl.io.writer import save_file

    folder = _folder(ctx, name)
    lora = folder / "adapter.safetensors"
    if not lora.exists():
        save_file(tensors, lora, metadata)
    out = folder / "baked.safetensors"
    recipe = folder / "recipe.yaml"
    recipe.write_text(json.dumps({"models": {"base": str(ctx.sdxl)},
                                  "steps": {"output": {"lora": str(lora), "model": "base", "strength": 0.5}}}))
    return [Case(f"{name}/bake", ("bake", str(ctx.sdxl), str(lora), "-o", str(out)), CHECKPOINT,
                 ("adapter.safetensors", *needles), (lora, ctx.sdxl), out),
            Case(f"{name}/merge", ("merge", str(recipe), "-o", str(out)), CHECKPOINT,
                 ("adapter.safetensors", *needles), (lora, ctx.sdxl, recipe), out)]


@case("lora-factors-huge", new=HANG)
def _(ctx: Ctx) -> list[Case]:
    # a 200 KB file whose up @ down would be 25000 x 25000 fp32 (2.5 GB) for a 32 x 32 layer
    tensors = {f"{LORA}.lora_down.weight": torch.zeros(1, 25000), f"{LORA}.lora_up.weight": torch.zeros(25000, 1)}
    return _lora_cases(ctx, "lora-factors-huge", tensors, (LORA, "do not fit the layer's weight [32, 32]"))


@case("lora-rank-mismatch", new=INTERNAL)
def _(ctx: Ctx) -> list[Case]:
    tensors = {f"{LORA}.lora_down.weight": torch.zeros(4, 32), f"{LORA}.lora_up.weight": torch.zeros(32, 5)}
    return _lora_cases(ctx, "lora-rank-mismatch", tensors, (LORA, "not a valid factorisation"))


@case("loha-factors-huge", new=HANG)
def _(ctx: Ctx) -> list[Case]:
    tensors = {f"{LORA}.hada_w1_a": torch.zeros(20000, 1), f"{LORA}.hada_w1_b": torch.zeros(1, 20000),
               f"{LORA}.hada_w2_a": torch.zeros(20000, 1), f"{LORA}.hada_w2_b": torch.zeros(1, 20000)}
    return _lora_cases(ctx, "loha-factors-huge", tensors, (LORA, "do not fit"))


@case("lokr-kron-huge", new=HANG)
def _(ctx: Ctx) -> list[Case]:
    tensors = {f"{LORA}.lokr_w1": torch.zeros(200, 200), f"{LORA}.lokr_w2": torch.zeros(200, 200)}  # 1.6e9 values
    return _lora_cases(ctx, "lokr-kron-huge", tensors, (LORA, "do not fit"))


@case("lora-dora-scale-wrong-shape", new=INTERNAL)
def _(ctx: Ctx) -> list[Case]:
    tensors = {f"{LORA}.lora_down.weight": torch.zeros(4, 32), f"{LORA}.lora_up.weight": torch.zeros(32, 4),
               f"{LORA}.dora_scale": torch.ones(7, 1)}
    return _lora_cases(ctx, "lora-dora-scale-wrong-shape", tensors, (LORA, "dora_scale of shape [7, 1]"))


def _peft(ctx: Ctx, name: str, metadata: str, needles: tuple[str, ...]) -> list[Case]:
    prefix = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    tensors = {f"{prefix}.lora_A.weight": torch.zeros(4, 32), f"{prefix}.lora_B.weight": torch.zeros(32, 4)}
    return _lora_cases(ctx, name, tensors, needles, {"lora_adapter_metadata": metadata})


@case("peft-alpha-list", new=INTERNAL)
def _(ctx: Ctx) -> list[Case]:
    return _peft(ctx, "peft-alpha-list", json.dumps({"unet.lora_alpha": [8, 8]}), ("lora_alpha is [8, 8]",))


@case("peft-alpha-text", new=INTERNAL)
def _(ctx: Ctx) -> list[Case]:
    return _peft(ctx, "peft-alpha-text", json.dumps({"unet.lora_alpha": "eight"}), ("not a number",))


@case("peft-metadata-deep", new=INTERNAL)
def _(ctx: Ctx) -> list[Case]:
    return _peft(ctx, "peft-metadata-deep", "[" * 50_000 + "]" * 50_000, ("nested deeper",))


# ------------------------------------------------------------------------------------------------ diffusers folders


def _pipe(ctx: Ctx, name: str) -> Path:
    """A private copy of a tiny SD1.5 diffusers export (made once per session)."""
    master = ctx.root / "_pipe-sd15"
    if not master.exists():
        from mergekit_sdxl.export.diffusers import export_diffusers

        export_diffusers(ctx.sd15, master)
    copy = _folder(ctx, name) / "pipe"
    if not copy.exists():
        shutil.copytree(master, copy)
    return copy


def _pipe_cases(ctx: Ctx, name: str, edit: dict[str, bytes | int], needles: tuple[str, ...]) -> list[Case]:
    pipe = _pipe(ctx, name)
    for rel, content in edit.items():
        target = pipe / rel
        if isinstance(content, int):  # a sparse file of that size: no disk used, huge if read whole
            with open(target, "wb") as f:
                f.truncate(content)
        else:
            target.write_bytes(content)
    cases = checkpoint_cases(ctx, name, "pipe", None, CHECKPOINT, needles)
    inputs = tuple(p for p in pipe.rglob("*") if p.is_file() and p.stat().st_size < (64 << 20))
    return [Case(c.name, c.argv, c.code, c.needles, inputs + tuple(p for p in c.inputs if p.is_file()), c.output)
            for c in cases]


@case("diffusers-index-deep", new=INTERNAL)
def _(ctx: Ctx) -> list[Case]:
    return _pipe_cases(ctx, "diffusers-index-deep", {"model_index.json": b"[" * 100_000 + b"]" * 100_000},
                       ("model_index.json", "nested deeper"))


@case("diffusers-index-2gb", new=HANG)
def _(ctx: Ctx) -> list[Case]:
    return _pipe_cases(ctx, "diffusers-index-2gb", {"model_index.json": 2 << 30},
                       ("model_index.json", "2,147,483,648 bytes of JSON"))


@case("diffusers-class-name-list", new=INTERNAL)
def _(ctx: Ctx) -> list[Case]:
    return _pipe_cases(ctx, "diffusers-class-name-list",
                       {"model_index.json": json.dumps({"_class_name": ["StableDiffusionPipeline"]}).encode()},
                       ("model_index.json", "no _class_name string"))


@case("diffusers-shard-index-deep", new=INTERNAL)
def _(ctx: Ctx) -> list[Case]:
    pipe = _pipe(ctx, "diffusers-shard-index-deep")
    weights = pipe / "unet" / "diffusion_pytorch_model.safetensors"
    if weights.exists():
        weights.rename(pipe / "unet" / "shard.safetensors")
    return _pipe_cases(ctx, "diffusers-shard-index-deep",
                       {"unet/diffusion_pytorch_model.safetensors.index.json": b'{"weight_map": ' + b"[" * 100_000},
                       ("index.json", "nested deeper"))


# ------------------------------------------------------------------------------------------------ scaled fp8


@case("scaled-fp8-scale-wrong-shape", new=INTERNAL)
def _(ctx: Ctx) -> list[Case]:
    from mergekit_sdxl.io.writer import save_file

    folder = _folder(ctx, "scaled-fp8-scale-wrong-shape")
    path = folder / "fp8.safetensors"
    if not path.exists():
        save_file({"model.diffusion_model.out.2.weight": torch.ones(4, 4).to(torch.float8_e4m3fn),
                   "model.diffusion_model.out.2.scale_weight": torch.ones(3), "scaled_fp8": torch.empty(0,
                   dtype=torch.float8_e4m3fn)}, path)
    out = folder / "out.safetensors"
    return [Case("scaled-fp8-scale-wrong-shape/convert", ("convert", str(path), str(out), "--dtype", "fp16"),
                 CHECKPOINT, ("fp8.safetensors", "scale has shape [3]"), (path,), out)]


# ------------------------------------------------------------------------------------------------ outputs


def _recipe(ctx: Ctx, folder: Path, a: Path | None = None) -> Path:
    recipe = folder / "recipe.yaml"
    recipe.write_text(recipe_text(str(a or ctx.sdxl), str(ctx.sdxl)))
    return recipe


def _copy(src: Path, dst: Path) -> Path:
    if not dst.exists():
        shutil.copyfile(src, dst)
    return dst


@case("out-hardlink-to-input", new=LOSS)
def _(ctx: Ctx) -> list[Case]:
    folder = _folder(ctx, "out-hardlink-to-input")
    a = _copy(ctx.sdxl, folder / "a.safetensors")
    link = folder / "link.safetensors"
    if not link.exists():
        os.link(a, link)
    recipe = _recipe(ctx, folder, a)
    return [Case("out-hardlink-to-input/merge", ("merge", str(recipe), "-o", str(link), "--overwrite"), OUTPUT,
                 ("link.safetensors", "is one of the inputs", "a.safetensors"), (a, recipe, ctx.sdxl)),
            Case("out-hardlink-to-input/convert", ("convert", str(a), str(link), "--dtype", "fp32", "--overwrite"),
                 OUTPUT, ("link.safetensors", "is one of the inputs"), (a,))]


@case("out-symlink-to-input", new=LOSS)
def _(ctx: Ctx) -> list[Case]:
    folder = _folder(ctx, "out-symlink-to-input")
    a = _copy(ctx.sdxl, folder / "a.safetensors")
    link = folder / "link.safetensors"
    if not link.is_symlink():
        link.symlink_to(a)
    recipe = _recipe(ctx, folder, a)
    return [Case("out-symlink-to-input/merge", ("merge", str(recipe), "-o", str(link), "--overwrite"), OUTPUT,
                 ("link.safetensors", "is one of the inputs"), (a, recipe, ctx.sdxl)),
            Case("out-symlink-to-input/convert", ("convert", str(a), str(link), "--dtype", "fp32", "--overwrite"),
                 OUTPUT, ("link.safetensors", "is one of the inputs"), (a,))]


@case("out-symlink-elsewhere", new=LOSS)
def _(ctx: Ctx) -> list[Case]:
    folder = _folder(ctx, "out-symlink-elsewhere")
    precious = folder / "precious.txt"
    precious.write_text("someone's notes")
    link = folder / "out.safetensors"
    if not link.is_symlink():
        link.symlink_to(precious)
    recipe = _recipe(ctx, folder)
    return [Case("out-symlink-elsewhere/merge", ("merge", str(recipe), "-o", str(link), "--overwrite"), OUTPUT,
                 ("out.safetensors", "symbolic link"), (precious, recipe, ctx.sdxl)),
            Case("out-symlink-elsewhere/convert", ("convert", str(ctx.sdxl), str(link), "--dtype", "fp32",
                                                   "--overwrite"), OUTPUT, ("symbolic link",), (precious, ctx.sdxl))]


@case("out-device-node", new=LOSS)
def _(ctx: Ctx) -> list[Case]:
    folder = _folder(ctx, "out-device-node")
    null = folder / "null"
    if not null.exists():
        try:  # a second /dev/null (needs root): replacing the real one would break the system under test
            os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        except PermissionError:  # not root: the real one, which a non-root run could not replace anyway
            null = Path("/dev/null")
    recipe = _recipe(ctx, folder)
    needles = ("null", "not a regular file")
    return [Case("out-device-node/merge", ("merge", str(recipe), "-o", str(null), "--overwrite"), OUTPUT, needles,
                 (recipe, ctx.sdxl)),
            Case("out-device-node/convert", ("convert", str(ctx.sdxl), str(null), "--dtype", "fp16", "--overwrite"),
                 OUTPUT, needles, (ctx.sdxl,)),
            Case("out-device-node/make-test-checkpoint", ("make-test-checkpoint", "--arch", "sd15", "-o", str(null),
                                                          "--overwrite"), OUTPUT, needles)]


@case("out-fifo", new=LOSS)
def _(ctx: Ctx) -> list[Case]:
    folder = _folder(ctx, "out-fifo")
    fifo = folder / "pipe.safetensors"
    if not fifo.exists():
        os.mkfifo(fifo)
    return [Case("out-fifo/convert", ("convert", str(ctx.sdxl), str(fifo), "--dtype", "fp16", "--overwrite"),
                 OUTPUT, ("pipe.safetensors", "not a regular file"), (ctx.sdxl,))]


@case("out-is-the-recipe", new=LOSS)
def _(ctx: Ctx) -> list[Case]:
    folder = _folder(ctx, "out-is-the-recipe")
    recipe = _recipe(ctx, folder)
    return [Case("out-is-the-recipe/merge", ("merge", str(recipe), "-o", str(recipe), "--overwrite"), OUTPUT,
                 ("recipe.yaml", "is one of the inputs"), (recipe, ctx.sdxl))]


@case("out-is-the-lora", new=LOSS)
def _(ctx: Ctx) -> list[Case]:
    from mergekit_sdxl.io.writer import save_file

    folder = _folder(ctx, "out-is-the-lora")
    lora = folder / "style.safetensors"
    if not lora.exists():
        save_file({f"{LORA}.lora_down.weight": torch.zeros(4, 32), f"{LORA}.lora_up.weight": torch.zeros(32, 4)}, lora)
    recipe = folder / "recipe.yaml"
    recipe.write_text(json.dumps({"models": {"base": str(ctx.sdxl)},
                                  "steps": {"output": {"lora": str(lora), "model": "base"}}}))
    return [Case("out-is-the-lora/merge", ("merge", str(recipe), "-o", str(lora), "--overwrite"), OUTPUT,
                 ("style.safetensors", "is one of the inputs"), (lora, recipe, ctx.sdxl)),
            Case("out-is-the-lora/bake", ("bake", str(ctx.sdxl), str(lora), "-o", str(lora), "--overwrite"), OUTPUT,
                 ("style.safetensors", "is one of the inputs"), (lora, ctx.sdxl)),
            Case("out-is-the-lora/resize", ("resize-lora", str(lora), "-o", str(lora), "--overwrite", "--rank", "2"),
                 OUTPUT, ("style.safetensors", "is one of the inputs"), (lora,)),
            Case("out-is-the-lora/merge-lora", ("merge-lora", str(lora), str(lora), "-o", str(lora), "--overwrite"),
                 OUTPUT, ("style.safetensors", "is one of the inputs"), (lora,))]


@case("out-is-extract-input", new=LOSS)
def _(ctx: Ctx) -> list[Case]:
    folder = _folder(ctx, "out-is-extract-input")
    tuned = _copy(ctx.sdxl, folder / "tuned.safetensors")
    base = _copy(ctx.sdxl, folder / "base.safetensors")
    return [Case("out-is-extract-input/output", ("extract-lora", str(base), str(tuned), "-o", str(base),
                                                 "--overwrite"), OUTPUT, ("base.safetensors", "is one of the inputs"),
                 (base, tuned)),
            Case("out-is-extract-input/report", ("extract-lora", str(base), str(tuned), "-o",
                                                 str(folder / "x.safetensors"), "--report", str(tuned), "--overwrite"),
                 OUTPUT, ("tuned.safetensors", "is one of the inputs"), (base, tuned), folder / "x.safetensors")]


@case("out-is-diff-input", new=LOSS)
def _(ctx: Ctx) -> list[Case]:
    folder = _folder(ctx, "out-is-diff-input")
    a = _copy(ctx.sdxl, folder / "a.safetensors")
    return [Case("out-is-diff-input/heatmap", ("diff", str(a), str(ctx.sdxl), "--heatmap", str(a), "--overwrite"),
                 OUTPUT, ("a.safetensors", "is one of the inputs"), (a, ctx.sdxl))]


@case("out-is-the-vae", new=LOSS)
def _(ctx: Ctx) -> list[Case]:
    folder = _folder(ctx, "out-is-the-vae")
    vae = _copy(ctx.sdxl, folder / "vae.safetensors")
    recipe = folder / "recipe.yaml"
    recipe.write_text(json.dumps({"models": {"a": str(ctx.sdxl), "v": str(vae)}, "steps": {"output": "a"},
                                  "output": {"vae": "v"}}))
    return [Case("out-is-the-vae/merge", ("merge", str(recipe), "-o", str(vae), "--overwrite"), OUTPUT,
                 ("vae.safetensors", "is one of the inputs"), (vae, recipe, ctx.sdxl))]


@case("out-inside-input-folder", new=LOSS)
def _(ctx: Ctx) -> list[Case]:
    pipe = _pipe(ctx, "out-inside-input-folder")
    folder = ctx.root / "out-inside-input-folder"
    inputs = tuple(p for p in pipe.rglob("*") if p.is_file())
    weights = pipe / "unet" / "diffusion_pytorch_model.safetensors"
    recipe = folder / "recipe.yaml"
    recipe.write_text(json.dumps({"models": {"a": str(pipe), "b": str(ctx.sd15)},
                                  "steps": {"output": "a + 0.5 * (b - a)"}, "output": {"missing_keys": "take_first"}}))
    extra = ("--no-input-hashes",)
    return [Case("out-inside-input-folder/merge-over-file", ("merge", str(recipe), "-o", str(weights), "--overwrite",
                                                             *extra), OUTPUT, ("is one of the inputs",),
                 (*inputs, recipe)),
            Case("out-inside-input-folder/merge-new-file", ("merge", str(recipe), "-o", str(pipe / "x.safetensors"),
                                                            *extra), OUTPUT, ("inside the input folder",),
                 (*inputs, recipe), pipe / "x.safetensors"),
            Case("out-inside-input-folder/convert", ("convert", str(pipe), str(pipe / "unet" / "y.safetensors"),
                                                     "--dtype", "fp16"), OUTPUT, ("inside the input folder",), inputs,
                 pipe / "unet" / "y.safetensors")]


@case("export-over-inputs", new=LOSS)
def _(ctx: Ctx) -> list[Case]:
    folder = _folder(ctx, "export-over-inputs")
    holder = folder / "models"
    holder.mkdir(exist_ok=True)
    model = _copy(ctx.sd15, holder / "model.safetensors")
    notes = holder / "notes.txt"
    notes.write_text("mine")
    pipe = _pipe(ctx, "export-over-inputs")
    pipe_inputs = tuple(p for p in pipe.rglob("*") if p.is_file())
    user = folder / "user"
    user.mkdir(exist_ok=True)
    (user / "a.txt").write_text("mine")
    plain = folder / "plain.bin"
    plain.write_bytes(b"x")
    return [
        Case("export-over-inputs/folder-holding-input", ("export", str(model), "-o", str(holder), "--overwrite"),
             OUTPUT, ("models", "holds"), (model, notes)),
        Case("export-over-inputs/input-folder", ("export", str(pipe), "-o", str(pipe), "--overwrite"), OUTPUT,
             ("pipe",), pipe_inputs),
        Case("export-over-inputs/user-folder-overwrite", ("export", str(ctx.sd15), "-o", str(user), "--overwrite"),
             OUTPUT, ("user", "not written by mergekit-sdxl"), (user / "a.txt", ctx.sd15)),
        Case("export-over-inputs/user-folder", ("export", str(ctx.sd15), "-o", str(user)), OUTPUT,
             ("user", "already exists"), (user / "a.txt",)),
        Case("export-over-inputs/regular-file", ("export", str(ctx.sd15), "-o", str(plain), "--overwrite"), OUTPUT,
             ("plain.bin", "not a folder"), (plain,)),
    ]


@case("out-permission-denied", new=INTERNAL)
def _(ctx: Ctx) -> list[Case]:
    """The output folder refuses writes (EACCES, as for a read-only folder): exit 6, one line, for every writer
    (export and grid used to fail with exit 1 'internal error')."""
    folder = _folder(ctx, "out-permission-denied")
    locked = folder / "locked"
    locked.mkdir(exist_ok=True)
    recipe = _recipe(ctx, folder)
    return [
        Case("out-permission-denied/export", ("export", str(ctx.sd15), "-o", str(locked / "pipe")), OUTPUT,
             ("Permission denied",), (ctx.sd15,), locked / "pipe", denied=locked),
        Case("out-permission-denied/merge", ("merge", str(recipe), "-o", str(locked / "m.safetensors")), OUTPUT,
             ("Permission denied",), (ctx.sdxl, recipe), locked / "m.safetensors", denied=locked),
        Case("out-permission-denied/convert", ("convert", str(ctx.sd15), str(locked / "c.safetensors"), "--dtype",
                                               "fp16"), OUTPUT, ("Permission denied",), (ctx.sd15,),
             locked / "c.safetensors", denied=locked),
        Case("out-permission-denied/grid", ("-q", "grid", "--models", str(ctx.sd15), "--steps", "1", "--size", "64x64",
                                            "--device", "cpu", "-o", str(locked / "grid")), OUTPUT,
             ("Permission denied",), (ctx.sd15,), locked / "grid", denied=locked),
    ]


@case("out-header-too-big-for-struct", new=INTERNAL)
def _(ctx: Ctx) -> list[Case]:
    """A header length field of exactly 2**64-1 (struct-unpacked, compared, never allocated)."""
    content = struct.pack("<Q", 2**64 - 1) + b"{}"
    return checkpoint_cases(ctx, "out-header-too-big-for-struct", "max.safetensors", content, CHECKPOINT,
                            ("exceeds the",))



# ------------------------------------------------------------------------------------------------ recipes


def _two_models(ctx: Ctx, steps: object, **top: object) -> str:
    return json.dumps({"models": {"a": str(ctx.sdxl), "b": str(ctx.sdxl)}, "steps": steps, **top})


@case("recipe-number-5000-digits", new=INTERNAL)
def _(ctx: Ctx) -> list[Case]:
    text = (f"models: {{a: {ctx.sdxl}, b: {ctx.sdxl}}}\n"
            f"steps:\n  output: {{method: weighted_sum, a: a, b: b, alpha: {'9' * 5000}}}\n")
    return recipe_case(ctx, "recipe-number-5000-digits", text, RECIPE, (":3", "5000 characters"))


@case("recipe-regex-backreference", new=INTERNAL)
def _(ctx: Ctx) -> list[Case]:
    alpha = {"value": 0.5, "overrides": [{"match": r"(input)\1", "value": 1}]}
    text = _two_models(ctx, {"output": {"method": "weighted_sum", "a": "a", "b": "b", "alpha": alpha}})
    return recipe_case(ctx, "recipe-regex-backreference", text, RECIPE, ("overrides[0].match", "linear time"))


@case("recipe-regex-backtracking", new=HANG)
def _(ctx: Ctx) -> list[Case]:
    """Catastrophic for a backtracking engine on these keys; linear with RE2: the merge simply works."""
    alpha = {"value": 0.5, "overrides": [{"match": "^(([a-z_0-9])+.)+[A-Z]([a-z])+$", "value": 1},
                                         {"match": "(m+o+d+e+l+)+x", "value": 0}]}
    text = _two_models(ctx, {"output": {"method": "weighted_sum", "a": "a", "b": "b", "alpha": alpha}},
                       output={"drop": ["(.*a){12}$"]})
    folder = _folder(ctx, "recipe-regex-backtracking")
    recipe = folder / "recipe.yaml"
    recipe.write_text(text)
    out = folder / "out.safetensors"
    return [Case("recipe-regex-backtracking/merge", ("-q", "merge", str(recipe), "-o", str(out),
                                                     "--no-input-hashes"), 0, (), (recipe, ctx.sdxl), creates=out),
            Case("recipe-regex-backtracking/dry-run", ("merge", str(recipe), "-o", str(out), "--dry-run"), 0, (),
                 (recipe, ctx.sdxl))]


@case("convert-drop-regex", new=HANG)
def _(ctx: Ctx) -> list[Case]:
    folder = _folder(ctx, "convert-drop-regex")
    out = folder / "out.safetensors"
    return [Case("convert-drop-regex/backtracking", ("convert", str(ctx.sd15), str(out), "--dtype", "fp16", "--drop",
                                                     "^(([a-z_0-9])+.)+[A-Z]$", "--drop", "(.*a){15}$"), 0, (),
                 (ctx.sd15,), creates=out),
            Case("convert-drop-regex/backreference", ("convert", str(ctx.sd15), str(folder / "o2.safetensors"),
                                                      "--dtype", "fp16", "--drop", r"(model)\1"), 2,
                 ("--drop", "linear time"), (ctx.sd15,), folder / "o2.safetensors")]


@case("recipe-output-absolute", new=LOSS)
def _(ctx: Ctx) -> list[Case]:
    folder = _folder(ctx, "recipe-output-absolute")
    victim = folder / "victim.safetensors"
    victim.write_bytes(b"someone's file")
    text = _two_models(ctx, {"output": "a + 0.5 * (b - a)"}, output={"path": str(victim)})
    recipe = folder / "recipe.yaml"
    recipe.write_text(text)
    return [Case("recipe-output-absolute/merge", ("merge", str(recipe), "--overwrite"), RECIPE,
                 ("output.path", "is absolute"), (victim, recipe, ctx.sdxl)),
            Case("recipe-output-absolute/dry-run", ("merge", str(recipe), "--dry-run"), RECIPE,
                 ("output.path", "is absolute"), (victim, recipe, ctx.sdxl))]


@case("recipe-output-symlink-escape", new=LOSS)
def _(ctx: Ctx) -> list[Case]:
    folder = _folder(ctx, "recipe-output-symlink-escape")
    outside = ctx.root / "recipe-output-symlink-escape-target"
    outside.mkdir(exist_ok=True)
    link = folder / "models"
    if not link.is_symlink():
        link.symlink_to(outside)
    recipe = folder / "recipe.yaml"
    recipe.write_text(_two_models(ctx, {"output": "a + 0.5 * (b - a)"}, output={"path": "models/m.safetensors"}))
    return [Case("recipe-output-symlink-escape/merge", ("merge", str(recipe)), RECIPE,
                 ("output.path", "symbolic link"), (recipe, ctx.sdxl), outside / "m.safetensors")]


@case("recipe-forty-step-dag", new=HANG)
def _(ctx: Ctx) -> list[Case]:
    steps: dict = {"s1": {"method": "slerp", "a": "a", "b": "b", "alpha": 0.5}}
    for i in range(2, 41):
        steps[f"s{i}"] = {"method": "slerp", "a": f"s{i - 1}", "b": f"s{i - 1}", "alpha": 0.5}
    steps["output"] = {"method": "slerp", "a": "s40", "b": "s40", "alpha": 0.5}
    folder = _folder(ctx, "recipe-forty-step-dag")
    recipe = folder / "recipe.yaml"
    recipe.write_text(_two_models(ctx, steps))
    return [Case("recipe-forty-step-dag/dry-run", ("merge", str(recipe), "-o", str(folder / "o.safetensors"),
                                                   "--dry-run"), 0, (), (recipe, ctx.sdxl))]
