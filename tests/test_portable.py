"""The portability test mode, default part (the full second pass of the suites is `make test-portable`, slow).

- The I/O tests run again with os.pread/os.preadv/os.pwrite, signal.SIGHUP and glibc's symbols hidden
  (tests/portable/sitecustomize.py): the fallback path must pass them too.
- Every command of the CLI runs with non-ASCII file names in (a) the fallback path under a legacy Windows console
  encoding (PYTHONIOENCODING=cp1252) and (b) the normal path under LANG=C (Python's defaults: UTF-8 mode); the
  commands that print or store file names also run (c) under LANG=C with UTF-8 mode and locale coercion off (ASCII
  streams and file names, the harshest form). Nothing may raise UnicodeEncodeError or print a traceback, each
  command gets its documented exit code, and every file written in (a) is byte-identical to the same file written
  in (b): the rev2 merge of tiny models, convert, LoRA extraction / bake / resize / merge, export, diff, grid.
- The package opens no text file without an explicit encoding (Windows' default is the ANSI code page).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PORTABLE = Path(__file__).resolve().parent / "portable"
REV2 = ROOT / "recipes" / "kohaku_xl_gamma_rev2.yaml"
INPUT_NAMES = {"beta7": "ベータ7 Δ.safetensors", "anxl2": "アニメ2.safetensors", "anxl3": "アニメ3.safetensors",
               "base8": "base8 ‖ß‖.safetensors"}


def hidden_env(**extra: str) -> dict[str, str]:
    """The environment of the portability test mode (POSIX-only calls and glibc hidden)."""
    path = os.pathsep.join(p for p in (str(PORTABLE), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "MERGEKIT_TEST_HIDE_POSIX": "1", **extra}


def test_io_tests_pass_on_the_fallback_path(tmp_path):
    tests = ["tests/test_io_posio.py", "tests/test_io_reader.py", "tests/test_io_writer.py", "tests/test_platform.py"]
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp",
                           str(tmp_path / "bt"), *tests], cwd=ROOT, env=hidden_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and " failed" not in done.stdout


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_sdxl_family) -> dict[str, Path]:
    """The four tiny rev2 inputs under non-ASCII names (hard links: no copies)."""
    folder = tmp_path_factory.mktemp("入力")
    out = {}
    for alias, name in INPUT_NAMES.items():
        out[alias] = folder / name
        os.link(tiny_sdxl_family[alias], out[alias])
    return out


def _commands(work: Path, inputs: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    """(label, argv, expected exit code) for every command, writing under `work`."""
    from mergekit_sdxl.cli.main import COMMANDS

    recipe = work.parent / "recipe.yaml"  # UTF-8 text naming a non-ASCII input (found under LANG=C too)
    recipe.write_text(REV2.read_text(encoding="utf-8").replace("models/kxl-beta7.safetensors", str(inputs["beta7"])),
                      encoding="utf-8")

    models = [x for alias, path in inputs.items() for x in ("-m", f"{alias}={path}")]
    others = [x for alias, path in inputs.items() if alias != "beta7" for x in ("-m", f"{alias}={path}")]
    merged, lora, small = work / "マージ rev2.safetensors", work / "ロラ.safetensors", work / "small.safetensors"
    beta7, base8 = str(inputs["beta7"]), str(inputs["base8"])
    cmds: list[tuple[str, list[str], int]] = [("help", ["--help"], 0)]
    cmds += [(f"help {name}", [name, "--help"], 0) for name in COMMANDS]
    cmds += [
        ("make-test-checkpoint", ["make-test-checkpoint", "--arch", "sd15", "--size", "tiny", "-o",
                                  str(work / "テスト sd15.safetensors")], 0),
        ("inspect", ["inspect", beta7, "--blocks"], 0),
        ("inspect json", ["inspect", beta7, "--json"], 0),
        ("hash", ["hash", beta7, base8], 0),
        ("merge rev2", ["merge", str(REV2), "-o", str(merged), *models], 0),
        ("merge dry-run", ["merge", str(REV2), "--dry-run", *models], 0),
        ("convert fp8", ["convert", str(merged), str(work / "fp8 変換.safetensors"), "--dtype", "fp8_e4m3fn"], 0),
        ("extract-lora", ["extract-lora", base8, beta7, "-o", str(lora), "--rank", "4", "--conv-rank", "2"], 0),
        ("bake", ["bake", base8, str(lora), "-o", str(work / "焼き.safetensors"), "--strength", "0.5"], 0),
        ("resize-lora", ["resize-lora", str(lora), "-o", str(small), "--rank", "2", "--conv-rank", "1"], 0),
        ("merge-lora", ["merge-lora", str(lora), f"{small}:0.5", "-o", str(work / "合成.safetensors"), "--rank", "4",
                        "--conv-rank", "2"], 0),
        ("diff", ["diff", base8, beta7, "--heatmap", str(work / "差分.png")], 0),
        ("export", ["export", beta7, "-o", str(work / "エクスポート")], 0),
        ("grid", ["grid", "--models", beta7, "-p", "1girl, (smile:1.2) ★", "--seeds", "3", "--steps", "1",
                  "--size", "64x64", "--device", "cpu", "--dtype", "fp32", "-o", str(work / "グリッド")], 0),
        ("missing input", ["inspect", str(work / "存在しない Δ.safetensors")], 4),
        ("non-ASCII path in a recipe", ["merge", str(recipe), "--dry-run",
                                        *others], 0),
        ("reserved output name", ["merge", str(REV2), "-o", str(work / "CON.safetensors"), *models], 6),
        ("stream output name", ["merge", str(REV2), "-o", str(work / "out:v2.safetensors"), *models], 6),
    ]
    return cmds


def _battery(tmp_path: Path, name: str, inputs: dict[str, Path], env: dict[str, str],
             only: set[str] | None = None) -> tuple[Path, str, dict]:
    """Run every command (or those labelled in `only`) in one child process; returns (output folder, the child's
    stdout+stderr, exit codes)."""
    work = tmp_path / name / "出力"
    work.mkdir(parents=True)
    cmds = [c for c in _commands(work, inputs) if only is None or c[0] in only]
    spec = tmp_path / name / "commands.json"
    spec.write_text(json.dumps([[label, argv] for label, argv, _ in cmds]), encoding="utf-8")
    results = tmp_path / name / "results.json"
    env = {**env, "TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1", "COLUMNS": "100"}  # rich draws its progress bars
    done = subprocess.run([sys.executable, str(PORTABLE / "cli_battery.py"), str(spec), str(results)], cwd=tmp_path,
                          env=env, capture_output=True, timeout=900)
    output = (done.stdout + done.stderr).decode("latin-1")  # any bytes; the checks below look for ASCII text
    assert done.returncode == 0, output[-4000:]
    codes = json.loads(results.read_text(encoding="utf-8"))
    wrong = {label: (codes.get(label), want) for label, _, want in cmds if codes.get(label) != want}
    assert not wrong, f"{name}: exit codes (got, expected): {wrong}\n{output[-4000:]}"
    for bad in ("Traceback", "UnicodeEncodeError", "UnicodeDecodeError", "internal error"):
        assert bad not in output, f"{name}: {bad!r} in the output:\n{output[-4000:]}"
    return work, output, codes


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


STRICT_ASCII = {"help", "help resize-lora", "inspect", "hash", "merge rev2", "missing input",
                "non-ASCII path in a recipe", "reserved output name"}


@pytest.mark.timeout(1200)  # about 2 min on an idle 2-core machine; much more when it is shared
def test_cli_runs_clean_under_cp1252_and_lang_c_with_identical_outputs_on_both_io_paths(tmp_path, inputs):
    cp1252 = hidden_env(PYTHONIOENCODING="cp1252")
    lang_c = {k: v for k, v in os.environ.items() if k not in ("PYTHONIOENCODING", "PYTHONUTF8")}
    lang_c.update(LANG="C", LC_ALL="C")  # as users get it: Python switches to UTF-8 mode in the C locale
    strict = {**lang_c, "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}  # ASCII streams and file names
    fallback, out_cp1252, _ = _battery(tmp_path, "cp1252-fallback", inputs, cp1252)
    normal, out_c, _ = _battery(tmp_path, "lang-c-normal", inputs, lang_c)
    ascii_out, out_ascii, _ = _battery(tmp_path, "lang-c-ascii", inputs, strict, only=STRICT_ASCII)

    # (a) legacy console: symbols arrive as ASCII stand-ins, a Japanese file name escaped but whole
    assert "fro:tau" in out_cp1252  # resize-lora's help: "fro:τ"
    assert "\\u5b58\\u5728" in out_cp1252  # 存在しない in the "missing input" error line
    assert "reserved device name on Windows" in out_cp1252 and "':'" in out_cp1252
    # (b) strict ASCII: symbols in ASCII, the undecodable bytes of file names written back as they were
    assert "存在しない".encode().decode("latin-1") in out_ascii and "fro:tau" in out_ascii

    ours, theirs = _files(fallback), _files(normal)
    assert ours.keys() == theirs.keys()
    expected = {"マージ rev2.safetensors", "ロラ.safetensors", "エクスポート/model_index.json"}
    assert expected <= ours.keys() and any(name.startswith("グリッド/") for name in ours)
    differ = [name for name in ours if ours[name] != theirs[name]]
    assert differ == [], f"outputs differ between the fallback and the normal I/O path: {differ}"
    merged = "マージ rev2.safetensors"
    assert _files(ascii_out)[merged] == ours[merged]  # file names in its metadata stored as the UTF-8 they are


# text files ---------------------------------------------------------------------------------------------------
TEXT_CALLS = {"open", "read_text", "write_text"}


def _text_opens_without_encoding(path: Path) -> list[int]:
    """Lines of `open(...)`, `x.read_text()`, `x.write_text(data)` and `x.open("r")` calls in text mode that name
    no encoding (`os.open` and other `.open` calls without a literal text mode are not file opens we can judge)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call):
            continue
        attribute = isinstance(node.func, ast.Attribute)
        name = node.func.attr if attribute else getattr(node.func, "id", None)
        if name not in TEXT_CALLS:
            continue
        mode_args = node.args[0:1] if attribute else node.args[1:2]  # Path.open(mode) / open(file, mode)
        mode = next((a.value for a in mode_args if isinstance(a, ast.Constant)), None)
        mode = next((k.value.value for k in node.keywords if k.arg == "mode" and isinstance(k.value, ast.Constant)),
                    mode)
        if name == "open" and (attribute and not isinstance(mode, str) or isinstance(mode, str) and "b" in mode):
            continue
        positional_encoding = (name == "read_text" and node.args) or (name == "write_text" and len(node.args) > 1)
        if "encoding" not in {k.arg for k in node.keywords} and not positional_encoding:
            lines.append(node.lineno)
    return lines


def test_every_text_file_is_opened_with_an_explicit_encoding():
    """On Windows open()/read_text() default to the ANSI code page (cp1252): a recipe with a Japanese comment
    would fail to load there."""
    found = {str(p.relative_to(ROOT)): lines for p in sorted((ROOT / "mergekit_sdxl").rglob("*.py"))
             if (lines := _text_opens_without_encoding(p))}
    assert found == {}
