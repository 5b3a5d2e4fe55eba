"""Runs every case of tests/broken_corpus.py through the CLI and checks each promise the README makes for it.

Every case runs in a child forked from a server process that imported the tool once (tests/hostile_server.py), so
a hang is killed by a timeout instead of hanging the test run, and the child's peak RSS and wall time are measured.
For each case: the exit code is the README's; stderr is one line naming the file (and key/step); there is no
traceback (tracebacks only with --debug); nothing is left behind (the case's folder holds exactly the files it held
before: no output, no temporary file or folder); the inputs are byte-identical afterwards (sha256); injected code
did not run; the peak RSS stays within RSS_LIMIT_MB of an idle child's and the wall time within TIME_LIMIT_S.
Cases with exit code 0 (hostile input that must simply work, fast) check that the output appeared instead.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import broken_corpus as bc  # noqa: E402
import hostile_corpus  # noqa: E402 - registers the issue-10 cases into the corpus
from broken_corpus import record  # noqa: E402
from hostile_server import HostileServer  # noqa: E402

from mergekit_sdxl.cli.main import main  # noqa: E402
from mergekit_sdxl.errors import CheckpointError  # noqa: E402

RSS_LIMIT_MB = 300  # tiny inputs: anything near this means something was allocated that should not have been
TIME_LIMIT_S = 60  # generous for a loaded 2-core CI machine; a hang is killed at HANG_S
HANG_S = 120


@pytest.fixture(scope="session")
def corpus_ctx(tmp_path_factory, tiny_sdxl, tiny_sd15) -> bc.Ctx:
    return bc.Ctx(tmp_path_factory.mktemp("corpus"), tiny_sdxl, tiny_sd15)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = HostileServer({"XDG_CACHE_HOME": str(tmp_path_factory.mktemp("xdg-cache"))})
    yield s
    s.close()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "-"


def listing(folder: Path | None) -> set[str]:
    if folder is None or not folder.is_dir():
        return set()
    out = set()
    for root, dirs, files in os.walk(folder):
        out.update(os.path.relpath(os.path.join(root, n), folder) for n in dirs + files)
    return out


def check(c: bc.Case, result: dict, before: set[str], baseline_mb: float) -> None:
    err = result["stderr"]
    lines = [line for line in err.splitlines() if line.strip()]
    assert not result["timed_out"], f"{c.name}: hung (killed after {HANG_S} s)"
    assert result["code"] == c.code, f"{c.name}: exit {result['code']}, expected {c.code}; stderr: {err}"
    assert "Traceback" not in err and "Exception ignored" not in err, f"{c.name}: traceback without --debug:\n{err}"
    if c.code != 0:
        assert len(lines) == 1 or (c.code == 2 and len(lines) <= 3), f"{c.name}: not one line: {err!r}"
        for needle in c.needles:
            assert needle in lines[-1], f"{c.name}: {needle!r} not in {lines[-1]!r}"
    if c.output is not None and c.code != 0:
        assert not c.output.exists(), f"{c.name}: output {c.output} exists"
    if c.creates is not None:
        assert c.creates.exists(), f"{c.name}: {c.creates} was not written"
    after = listing(c.folder)
    if c.creates is not None and c.folder is not None:
        after.discard(os.path.relpath(c.creates, c.folder))
    assert after == before, f"{c.name}: files appeared or vanished: +{sorted(after - before)} -{sorted(before - after)}"
    if c.marker is not None:
        assert not c.marker.exists(), f"{c.name}: injected code ran ({c.marker} was created)"
    grown = result["maxrss_mb"] - baseline_mb
    assert grown < RSS_LIMIT_MB, f"{c.name}: peak RSS grew by {grown:.0f} MB"
    assert result["seconds"] < TIME_LIMIT_S, f"{c.name}: took {result['seconds']:.1f} s"


@pytest.mark.parametrize("builder", bc.case_names())
def test_broken_input(builder, corpus_ctx, server):
    cases = bc.build(corpus_ctx, [builder])
    assert cases
    baseline = server.baseline_mb()
    for c in cases:
        before_hash = {p: sha(p) for p in c.inputs}
        before = listing(c.folder)
        if c.creates is not None and c.creates.exists():
            c.creates.unlink()
            before = listing(c.folder)
        try:
            result = server.run(c.argv, deny=c.denied, timeout=HANG_S)
            check(c, result, before, baseline)
            assert {p: sha(p) for p in c.inputs} == before_hash, f"{c.name}: an input changed"
        except BaseException:
            record("corpus", c.name, False, new=c.new, promise=c.promise)
            raise
        record("corpus", c.name, True, new=c.new, promise=c.promise, rss_mb=round(result["maxrss_mb"] - baseline, 1),
               seconds=round(result["seconds"], 2))


def test_every_issue10_case_is_counted_with_its_class():
    """Each builder of tests/hostile_corpus.py is registered as new, with a class, so the counts in
    benchmarks/RESULTS.md include it; the older corpus is not counted as new."""
    hostile = {name for name, fn in bc.BUILDERS.items() if fn.__module__ == hostile_corpus.__name__}
    assert len(hostile) >= 50 and set(bc.NEW) == hostile
    assert set(bc.NEW.values()) == set(bc.CLASSES)


def test_debug_shows_the_exception(corpus_ctx):
    c = bc.build(corpus_ctx, ["st-invalid-json"])[0]
    with pytest.raises(CheckpointError, match="not valid JSON"):
        main(["--debug", *c.argv])


def test_lora_for_wrong_architecture(corpus_ctx, server, tmp_path):
    import torch

    from mergekit_sdxl.io.writer import save_file

    # an SD1.5 kohya LoRA (768-wide cross-attention) baked into an SDXL checkpoint: refused, exit 4
    prefix = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    lora = tmp_path / "sd15_lora.safetensors"
    save_file({f"{prefix}.lora_down.weight": torch.zeros(4, 768), f"{prefix}.lora_up.weight": torch.zeros(320, 4),
               f"{prefix}.alpha": torch.tensor(4.0)}, lora)
    out = tmp_path / "baked.safetensors"
    before = sha(corpus_ctx.sdxl)
    result = server.run(("bake", str(corpus_ctx.sdxl), str(lora), "-o", str(out)), timeout=HANG_S)
    assert result["code"] in (2, 4) and "Traceback" not in result["stderr"], result
    assert not out.exists() and sha(corpus_ctx.sdxl) == before
