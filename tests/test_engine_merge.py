"""The merge engine end to end on tiny real-layout SDXL / SD1.5 checkpoints."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from mergekit_sdxl.cli.main import main
from mergekit_sdxl.io.hashes import hash_file

REV2 = Path(__file__).resolve().parents[1] / "recipes" / "kohaku_xl_gamma_rev2.yaml"
VECTOR = [0, 0.1, 0.1, 0, 0.1, 0.1, 0, 0.1, 0.1, 0, 0, 0, 0, 0, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05]
NAMES = ["BASE", *[f"IN{i:02d}" for i in range(9)], "M00", *[f"OUT{i:02d}" for i in range(9)]]


def run_cli(*argv: str) -> int:
    try:
        main(["--quiet", *map(str, argv)])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def model_args(family: dict[str, Path]) -> list[str]:
    return [x for alias, path in family.items() for x in ("-m", f"{alias}={path}")]


def block_2023(key: str) -> str | None:
    """The `supermerger-2023` SDXL key -> block rule, written out independently of mergekit_sdxl.arch."""
    if "model" not in key or ("weight" not in key and "bias" not in key):
        return None
    if "time_embed" in key or "label_emb" in key:
        return None
    if key.startswith(("conditioner.embedders.", "first_stage_model.")):
        return "BASE"
    if key.startswith("model.diffusion_model.out."):
        return "OUT08"
    for pattern, fmt in ((r"\.input_blocks\.(\d+)\.", "IN{:02d}"), (r"\.output_blocks\.(\d+)\.", "OUT{:02d}")):
        if m := re.search(pattern, key):
            return fmt.format(int(m.group(1)))
    return "M00" if ".middle_block." in key else None


def test_rev2_equals_numpy_reference(tiny_sdxl_family: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "rev2.safetensors"
    assert run_cli("merge", REV2, *model_args(tiny_sdxl_family), "-o", out) == 0
    got = load_file(out)
    ins = {alias: load_file(path) for alias, path in tiny_sdxl_family.items()}
    weights = dict(zip(NAMES, VECTOR))
    checked = 0
    for key, value in got.items():
        b7, a2, a3, b8 = (ins[a][key] for a in ("beta7", "anxl2", "anxl3", "base8"))
        if value.dtype.kind != "f":
            np.testing.assert_array_equal(value, b7)
            continue
        f = [x.astype(np.float32) for x in (b7, a2, a3, b8)]
        rev2 = f[0] + 1.0 * (f[2] - f[1]) + 0.25 * (f[3] - f[0])
        block = block_2023(key)
        alpha = 0.0 if block is None else weights[block]
        ref = (1 - alpha) * rev2 + alpha * f[2]
        # within one fp16 rounding of the fp32 reference (plus slack for the different summation order)
        tol = np.abs(ref) * 2.0**-10 + 2.0**-24
        assert np.all(np.abs(value.astype(np.float32) - ref) <= tol), key
        checked += 1
    assert checked > 2000
    assert set(got) == set(ins["beta7"])


def test_rev2_lineage_metadata(tiny_sdxl_family: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "rev2.safetensors"
    assert run_cli("merge", REV2, *model_args(tiny_sdxl_family), "-o", out) == 0
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    recipe = json.loads(meta["mergekit_sdxl.recipe"])
    models = json.loads(meta["sd_merge_models"])
    for alias, path in tiny_sdxl_family.items():
        h = hash_file(path)
        assert recipe["inputs"][alias]["sha256"] == h.sha256
        assert recipe["inputs"][alias]["autov3_full"] == h.autov3
        assert models[h.sha256]["legacy_hash"] == h.legacy
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert json.loads(meta["sd_merge_recipe"])["primary_model_hash"] in models
    # a second-generation merge keeps the first generation's lineage
    again = tmp_path / "gen2.safetensors"
    recipe2 = tmp_path / "gen2.yaml"
    recipe2.write_text(f"models: {{a: {out}, b: {tiny_sdxl_family['base8']}}}\n"
                       "steps:\n  output: {method: weighted_sum, a: a, b: b, alpha: 0.5}\n")
    assert run_cli("merge", recipe2, "-o", again) == 0
    with safe_open(again, "pt") as f:
        lineage = json.loads(f.metadata()["sd_merge_models"])
    assert set(models) <= set(lineage)


def test_output_is_byte_identical_across_runs_and_threads(tiny_sdxl_family: dict[str, Path], tmp_path: Path) -> None:
    outs = []  # same file name in three folders: the name is part of the metadata
    for i, extra in enumerate(([], ["--threads", "1"], ["--threads", "3"])):
        (tmp_path / str(i)).mkdir()
        outs.append(tmp_path / str(i) / "out.safetensors")
        assert run_cli("merge", REV2, *model_args(tiny_sdxl_family), "-o", outs[-1], *extra) == 0
    assert outs[0].read_bytes() == outs[1].read_bytes() == outs[2].read_bytes()


def test_rev2_agrees_with_sd_mecha(tiny_sdxl_family: dict[str, Path], tmp_path: Path) -> None:
    sd_mecha = pytest.importorskip("sd_mecha")
    import torch

    recipe = tmp_path / "formula.yaml"
    recipe.write_text("models: {beta7: x, anxl2: x, anxl3: x, base8: x}\n"
                      'steps:\n  output: "beta7 + 1.0 * (anxl3 - anxl2) + 0.25 * (base8 - beta7)"\n')
    ours = tmp_path / "ours.safetensors"
    assert run_cli("merge", recipe, *model_args(tiny_sdxl_family), "-o", ours) == 0
    m = {a: sd_mecha.model(str(p)) for a, p in tiny_sdxl_family.items()}
    theirs = tmp_path / "mecha.safetensors"
    sd_mecha.merge(m["beta7"] + (m["anxl3"] - m["anxl2"]) + (m["base8"] - m["beta7"]) * 0.25, output=theirs,
                   output_dtype=torch.float16, merge_dtype=torch.float32, merge_device="cpu", output_device="cpu",
                   tqdm=_NoTqdm)
    a, b = load_file(ours), load_file(theirs)
    common = [k for k in a if k in b and a[k].dtype.kind == "f"]
    assert len(common) > 2000, (len(a), len(b))
    for key in common:
        x, y = a[key].astype(np.float32), b[key].astype(np.float32)
        assert np.all(np.abs(x - y) <= np.abs(x) * 2.0**-10 + 2.0**-24), key


class _NoTqdm:
    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __enter__(self) -> _NoTqdm:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, *args: object) -> None:
        pass

    def set_postfix(self, *args: object, **kwargs: object) -> None:
        pass


WS_RECIPE = "models: {a: A, b: B}\nsteps:\n  output: {method: weighted_sum, a: a, b: b, alpha: 0.5}\n"


def _recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize(("text", "code", "needle"), [
    ("models: {a: A, b: B}\nsteps:\n  output: 'a + b'\n", 3, "a + b"),
    ("models: {a: A, b: B}\nsteps:\n  output: 'a * 2'\n", 3, "a * 2"),
    ("models: {a: A, b: B}\nsteps:\n  output: 'a + 0.5 * (zz - b)'\n", 3, "zz"),
    ("models: {a: A, b: B}\nsteps:\n  x: {method: weighted_sum, a: y, b: b, alpha: 0.5}\n"
     "  y: {method: weighted_sum, a: x, b: a, alpha: 0.5}\n  output: 'x'\n", 3, "cycle"),
])
def test_plan_refusals_name_the_term(tiny_sdxl_family: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
                                     text: str, code: int, needle: str) -> None:
    recipe = _recipe(tmp_path, text)
    out = tmp_path / "out.safetensors"
    args = ["-m", f"a={tiny_sdxl_family['beta7']}", "-m", f"b={tiny_sdxl_family['anxl2']}"]
    assert run_cli("merge", recipe, *args, "-o", out) == code
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_mixed_architectures_fail_before_reading(tiny_sdxl: Path, tiny_sd15: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from mergekit_sdxl.io.reader import SafetensorsReader

    def no_reads(*args: object) -> None:
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(SafetensorsReader, "read", no_reads)
    recipe = _recipe(tmp_path, WS_RECIPE)
    out = tmp_path / "out.safetensors"
    assert run_cli("merge", recipe, "-m", f"a={tiny_sdxl}", "-m", f"b={tiny_sd15}", "-o", out) == 4
    assert "SD" in capsys.readouterr().err
    assert not out.exists()


def test_declared_arch_names_the_file_that_is_not(tiny_sdxl: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    recipe = _recipe(tmp_path, "arch: sd15\n" + WS_RECIPE)
    out = tmp_path / "out.safetensors"
    assert run_cli("merge", recipe, "-m", f"a={tiny_sdxl}", "-m", f"b={tiny_sdxl}", "-o", out) == 4
    err = capsys.readouterr().err
    assert err.startswith(f"error: {recipe}: the recipe declares `arch: sd15` (SD1.x) but model 'a' ({tiny_sdxl}) "
                          f"is SDXL, model 'b' ({tiny_sdxl}) is SDXL"), err
    assert "mix" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_missing_model_files_reported_all_at_once(tiny_sdxl: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    recipe = _recipe(tmp_path, """\
        models: {a: gone-a.safetensors, b: B, c: sub/gone-c.safetensors}
        steps:
          output: {method: add_difference, a: a, b: b, c: c, alpha: 0.5}
        """)
    out = tmp_path / "out.safetensors"
    for extra in ([], ["--dry-run"]):
        assert run_cli("merge", recipe, "-m", f"b={tiny_sdxl}", "-o", out, *extra) == 4
        err = capsys.readouterr().err
        assert err.startswith(f"error: {recipe}: 2 model file(s) not found (no such file): "
                              f"model 'a' -> {tmp_path / 'gone-a.safetensors'}; "
                              f"model 'c' -> {tmp_path / 'sub' / 'gone-c.safetensors'}; "
                              "give each with -m ALIAS=PATH (e.g. -m a="), err
        assert "model 'b'" not in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_missing_files_and_unresolved_hashes_reported_together(tiny_sdxl: Path, tmp_path: Path) -> None:
    from contextlib import ExitStack

    from mergekit_sdxl.engine.run import open_inputs
    from mergekit_sdxl.errors import CheckpointError, RecipeError
    from mergekit_sdxl.recipe.load import load_recipe

    recipe = _recipe(tmp_path, f"""\
        models: {{a: {{sha256: {'ab' * 32}}}, b: gone-b.safetensors}}
        steps:
          output: {{method: weighted_sum, a: a, b: b, alpha: 0.5}}
        """)
    with ExitStack() as stack, pytest.raises(CheckpointError) as info:  # a library caller that skipped the index
        open_inputs(load_recipe(recipe), stack)
    message = str(info.value)
    assert f"model 'b' -> {tmp_path / 'gone-b.safetensors'}; model 'a' -> named by hash only (sha256 {'ab' * 32})" \
        in message, message
    assert "-m ALIAS=PATH" in message and "--models-dir DIR" in message
    recipe.write_text(recipe.read_text().replace("gone-b.safetensors", str(tiny_sdxl)))
    with ExitStack() as stack, pytest.raises(RecipeError, match="1 model file.s. not found: model 'a' -> named by "
                                                                "hash only .*--models-dir"):
        open_inputs(load_recipe(recipe), stack)


def test_cli_reports_unindexed_hashes_and_missing_files_in_one_line(tiny_sdxl: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    """Through the model index (merge --models-dir): a hash no indexed file has and a path that does not exist are
    both named in the one error line, with the -m hint, before anything is read."""
    folder = tmp_path / "models"
    folder.mkdir()
    recipe = _recipe(tmp_path, f"""\
        models: {{a: {{sha256: {'ab' * 32}}}, b: gone-b.safetensors, c: {tiny_sdxl}}}
        steps:
          output: "a + 0.5 * (b - c)"
        """)
    code = run_cli("merge", recipe, "--models-dir", folder, "--db", tmp_path / "i.sqlite3", "-o", tmp_path / "o.st")
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 3 and len(err) == 1, err
    assert "models.a: no indexed file has sha256" in err[0], err
    assert f"model 'b' -> {tmp_path / 'gone-b.safetensors'} (no such file)" in err[0] and "-m ALIAS=PATH" in err[0]
    assert not (tmp_path / "o.st").exists()


def test_shape_mismatch_names_the_key(tiny_sdxl: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from mergekit_sdxl.io.writer import save_file

    tensors = load_file(tiny_sdxl)
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    tensors[key] = np.zeros((1,), dtype=np.float16)
    import torch

    bad = tmp_path / "bad.safetensors"
    save_file({k: torch.from_numpy(v) for k, v in tensors.items()}, bad)
    recipe = _recipe(tmp_path, WS_RECIPE)
    out = tmp_path / "out.safetensors"
    assert run_cli("merge", recipe, "-m", f"a={tiny_sdxl}", "-m", f"b={bad}", "-o", out) == 3
    assert key in capsys.readouterr().err
    assert not out.exists()


def test_interrupted_merge_leaves_nothing(tiny_sdxl_family: dict[str, Path], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from mergekit_sdxl.engine import evaluate

    calls = {"n": 0}
    original = evaluate.KeyEvaluator.evaluate

    def flaky(self: evaluate.KeyEvaluator, kp: object, loaded: object) -> object:
        calls["n"] += 1
        if calls["n"] == 500:
            raise KeyboardInterrupt
        return original(self, kp, loaded)

    monkeypatch.setattr(evaluate.KeyEvaluator, "evaluate", flaky)
    before = {p: p.read_bytes() for p in tiny_sdxl_family.values()}
    out = tmp_path / "out.safetensors"
    assert run_cli("merge", REV2, *model_args(tiny_sdxl_family), "-o", out) == 130
    assert list(tmp_path.iterdir()) == []
    assert all(p.read_bytes() == data for p, data in before.items())


def test_pinned_sha256_mismatch(tiny_sdxl_family: dict[str, Path], tmp_path: Path,
                                capsys: pytest.CaptureFixture) -> None:
    recipe = _recipe(tmp_path, f"""\
        models:
          a: {{path: {tiny_sdxl_family['beta7']}, sha256: {'a' * 64}}}
          b: {tiny_sdxl_family['anxl2']}
        steps:
          output: {{method: weighted_sum, a: a, b: b, alpha: 0.3}}
        """)
    out = tmp_path / "out.safetensors"
    assert run_cli("merge", recipe, "-o", out) == 3
    assert "'a'" in capsys.readouterr().err
    assert not out.exists()


def test_dry_run_reads_no_tensor(tiny_sdxl_family: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from mergekit_sdxl.io.reader import SafetensorsReader

    monkeypatch.setattr(SafetensorsReader, "read", lambda *a: (_ for _ in ()).throw(AssertionError("read")))
    out = tmp_path / "out.safetensors"
    assert run_cli("merge", REV2, *model_args(tiny_sdxl_family), "-o", out, "--dry-run") == 0
    text = capsys.readouterr().out
    assert "weighted_sum" in text and "0.75*beta7" in text
    assert not out.exists()
    # -o is where the output goes: the recipe's output.path (kohaku-xl-gamma-rev2.safetensors) appears nowhere
    assert "kohaku-xl-gamma-rev2" not in text, text
    assert [line.split(": ")[1] for line in text.splitlines() if line.startswith("output")] == [str(out)]


def test_dry_run_without_out_shows_the_recipe_output_where_it_resolves(tiny_sdxl_family: dict[str, Path],
                                                                       tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    recipe = _recipe(tmp_path, WS_RECIPE + "output: {path: sub/merged.safetensors}\n")
    (tmp_path / "sub").mkdir()
    args = ["-m", f"a={tiny_sdxl_family['beta7']}", "-m", f"b={tiny_sdxl_family['anxl2']}"]
    assert run_cli("merge", recipe, *args, "--dry-run") == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("output")]
    assert [line.split(": ")[1] for line in lines] == [str(tmp_path / "sub" / "merged.safetensors")]


def test_fp8_and_scaled_fp8_outputs(tiny_sdxl_family: dict[str, Path], tmp_path: Path) -> None:
    import torch

    plain = tmp_path / "fp8.safetensors"
    assert run_cli("merge", REV2, *model_args(tiny_sdxl_family), "-o", plain, "--dtype", "fp8_e4m3fn") == 0
    with safe_open(plain, "pt") as f:
        key = "model.diffusion_model.input_blocks.4.1.proj_in.weight"
        assert f.get_tensor(key).dtype == torch.float8_e4m3fn
        ids = f.get_tensor("conditioner.embedders.0.transformer.text_model.embeddings.position_ids")
        assert ids.dtype == torch.int64


def test_existing_output_needs_overwrite_and_inputs_are_never_outputs(tiny_sdxl_family: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    assert run_cli("merge", REV2, *model_args(tiny_sdxl_family), "-o", out) == 6
    assert out.read_bytes() == b"keep me"
    before = tiny_sdxl_family["beta7"].read_bytes()
    assert run_cli("merge", REV2, *model_args(tiny_sdxl_family), "-o", tiny_sdxl_family["beta7"], "--overwrite") == 6
    assert tiny_sdxl_family["beta7"].read_bytes() == before


@pytest.mark.parametrize("step", ["{method: weighted_sum, a: a, b: b, alpha: 1}", "{method: copy, a: b}"])
def test_a_copied_nan_fails_the_merge(tiny_sdxl_family: dict[str, Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str], step: str) -> None:
    """A NaN in B at alpha 1 (or copied) is refused like a computed one: exit 4 naming the key, no output."""
    from safetensors.numpy import save_file

    a, b = list(tiny_sdxl_family.values())[:2]
    tensors = load_file(b)
    key = "model.diffusion_model.input_blocks.4.1.proj_in.weight"
    tensors[key] = tensors[key].copy()
    tensors[key].reshape(-1)[-1] = np.nan
    bad = tmp_path / "b_nan.safetensors"
    save_file(tensors, bad)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"models: {{a: {a}, b: {bad}}}\nsteps:\n  output: {step}\n")
    out = tmp_path / "out.safetensors"
    assert run_cli("merge", recipe, "-o", out) == 4
    err = capsys.readouterr().err
    assert key in err and "non-finite" in err
    assert set(tmp_path.iterdir()) == {bad, recipe}
