"""mergekit_sdxl.platform: portable output names, glibc/Linux tuning only where present, CPU features without /proc."""

from __future__ import annotations

import codecs
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mergekit_sdxl.platform import cpu, libc, text
from mergekit_sdxl.platform.names import FORBIDDEN_CHARS, name_problem, output_name_problem

HIDDEN = os.environ.get("MERGEKIT_TEST_HIDE_POSIX") == "1"
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", [
    "CON", "con", "Con.safetensors", "NUL.safetensors", "nul.tar.gz", "AUX", "PRN.txt", "COM1", "com9.ckpt",
    "LPT1.safetensors", "lpt0", "COM\u00b9", "CONIN$", "conout$.x", "NUL .safetensors",
])
def test_windows_device_names_are_refused_with_or_without_extension(name):
    problem = name_problem(name)
    assert problem is not None and "reserved device name on Windows" in problem


@pytest.mark.parametrize("name,what", [
    ("model.", "ends with a dot"), ("model ", "ends with a space"), ("model.safetensors.", "ends with a dot"),
    ("model:v2.safetensors", "':'"), ("a<b", "'<'"), ('say"hi"', "'\"'"), ("a|b", "'|'"), ("what?", "'?'"),
    ("star*", "'*'"), ("back\\slash.safetensors", "'\\\\'"), ("tab\there", "'\\t'"), ("nul\x00byte", "'\\x00'"),
    ("", "no file name"), ("..", "not a file name"), (".", "not a file name"),
])
def test_names_windows_cannot_store_are_refused(name, what):
    problem = name_problem(name)
    assert problem is not None and what in problem, problem


@pytest.mark.parametrize("name", [
    "model.safetensors", "CONSOLE.safetensors", "nullable", "COM10", "LPT", "my model v2 (final).safetensors",
    "モデル.safetensors", ".hidden", "a.b.c", "CON_merge.safetensors", "xCON", "com1x.ckpt",
])
def test_ordinary_names_pass(name):
    assert name_problem(name) is None


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.text(alphabet=st.characters(blacklist_characters=FORBIDDEN_CHARS, min_codepoint=32), min_size=1,
               max_size=40).filter(lambda s: s[-1] not in ". " and s not in (".", "..")))
def test_only_device_stems_fail_among_names_of_allowed_characters(name):
    problem = name_problem(name)
    stem = name.split(".", 1)[0].rstrip(" ").upper()
    assert (problem is not None) == (stem in {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"}
                                     or (len(stem) == 4 and stem[:3] in ("COM", "LPT") and stem[3] in "0123456789¹²³"))


def test_output_paths_are_judged_by_their_last_component(tmp_path):
    assert output_name_problem(tmp_path / "CON" / "ok.safetensors") is None  # folders exist already or fail there
    assert output_name_problem(tmp_path / "aux.safetensors") is not None
    assert output_name_problem(str(tmp_path) + "/") is None  # the folder's own name
    assert output_name_problem(".") is not None


# glibc / Linux tuning ---------------------------------------------------------------------------------------
def test_glibc_tuning_applies_only_where_glibc_is():
    glibc = sys.platform.startswith("linux") and not HIDDEN and _libc_is_glibc()
    assert libc.is_glibc() == glibc
    assert libc.mallopt(libc.M_ARENA_MAX, 4) == glibc
    assert libc.can_advise_hugepages() == (sys.platform.startswith("linux") and not HIDDEN)


def _libc_is_glibc() -> bool:
    import platform

    return platform.libc_ver()[0] == "glibc"


def test_engine_buffers_and_malloc_settings_work_without_glibc():
    """With glibc hidden (the portability test mode) the engine's helpers still return usable buffers."""
    pytest.importorskip("torch")  # scripts/check_pythons.sh runs this file where torch is missing
    code = ("from mergekit_sdxl.engine import memory as m\n"
            "b = m.empty_bytes(8 << 20); b.fill_(7); assert int(b.sum()) == 7 * (8 << 20)\n"
            "print(m.tame_malloc(), m.limit_arenas(1))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent / "portable"),
                                                        os.environ.get("PYTHONPATH", "")]),
           "MERGEKIT_TEST_HIDE_POSIX": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# CPU features -----------------------------------------------------------------------------------------------
def test_bf16_from_proc_cpuinfo_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 avx2\n\nprocessor\t: 1\n")
    assert cpu.has_native_bf16(info)
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx2 xavx512_bf16\n")
    assert not cpu.has_native_bf16(info)


def test_without_proc_the_answer_comes_from_torchs_probe(tmp_path, monkeypatch):
    missing = tmp_path / "no-proc" / "cpuinfo"
    monkeypatch.setattr(cpu, "torch_cpu_flags", lambda: {"avx2", "amx_bf16"})
    assert cpu.has_native_bf16(missing)
    monkeypatch.setattr(cpu, "torch_cpu_flags", lambda: {"avx2"})
    assert not cpu.has_native_bf16(missing)


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="compares /proc/cpuinfo with torch's probe")
def test_torchs_probe_agrees_with_proc_cpuinfo_here():
    pytest.importorskip("torch")  # scripts/check_pythons.sh runs this file where torch is missing
    flags = cpu.cpu_flags()
    assert flags is not None
    probe = cpu.torch_cpu_flags()
    assert probe, "torch no longer exposes its CPU probe: macOS/Windows would always fall back to fp32"
    for flag in cpu.BF16_FLAGS:
        assert (flag in flags) == (flag in probe), flag


# processes --------------------------------------------------------------------------------------------------
def test_pid_alive_on_this_os():
    from mergekit_sdxl.platform.process import pid_alive

    assert pid_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not pid_alive(child.pid) or _pid_reused(child.pid)
    assert not pid_alive(0) and not pid_alive(-5)


def _pid_reused(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


class _Kernel32:
    """A stand-in for Windows' kernel32 that records what it was asked."""

    def __init__(self, handle: int, last_error: int = 0, wait: int = 0x102) -> None:
        self.handle, self.last_error, self.wait, self.calls = handle, last_error, wait, []

    def OpenProcess(self, access, inherit, pid):  # noqa: N802 - the Windows API's name
        self.calls.append(("open", access, pid))
        return self.handle

    def get_last_error(self):
        return self.last_error

    def WaitForSingleObject(self, handle, timeout):  # noqa: N802
        self.calls.append(("wait", handle, timeout))
        return self.wait

    def CloseHandle(self, handle):  # noqa: N802
        self.calls.append(("close", handle))


@pytest.mark.parametrize("k32,alive", [
    (_Kernel32(handle=0, last_error=87), False),   # ERROR_INVALID_PARAMETER: no such process
    (_Kernel32(handle=0, last_error=5), True),     # ERROR_ACCESS_DENIED: runs, under another user
    (_Kernel32(handle=44, wait=0x102), True),      # WAIT_TIMEOUT: still running
    (_Kernel32(handle=44, wait=0), False),         # signalled: it has exited
])
def test_windows_liveness_asks_the_kernel_and_never_signals(k32, alive):
    """On Windows os.kill(pid, 0) would send Ctrl-C to the process group: the check must use OpenProcess."""
    from mergekit_sdxl.platform.process import _windows_pid_alive

    assert _windows_pid_alive(1234, k32) is alive
    assert k32.calls[0][0] == "open" and k32.calls[0][2] == 1234
    assert k32.calls[0][1] & 0x00100000  # SYNCHRONIZE, needed for the wait
    if k32.handle:
        assert k32.calls[1] == ("wait", 44, 0) and k32.calls[-1] == ("close", 44)


# console text -----------------------------------------------------------------------------------------------
def _stream(encoding: str, errors: str = "strict") -> tuple[io.BytesIO, io.TextIOWrapper]:
    raw = io.BytesIO()
    return raw, io.TextIOWrapper(raw, encoding=encoding, errors=errors)


def test_a_cp1252_stream_gets_ascii_stand_ins_and_escapes_instead_of_an_error():
    raw, stream = _stream("cp1252")
    with pytest.raises(UnicodeEncodeError):
        stream.write("ΔW")
        stream.flush()
    raw, stream = _stream("cp1252")
    assert text.make_safe(stream)
    stream.write("‖ΔW‖² · x → y … fro:τ モデル é")
    stream.flush()
    assert raw.getvalue() == "||dW||² · x -> y … fro:tau \\u30e2\\u30c7\\u30eb é".encode("cp1252")


def test_an_ascii_stream_keeps_ascii_and_gives_surrogate_escaped_bytes_back():
    raw, stream = _stream("ascii", "surrogateescape")
    assert text.make_safe(stream)
    assert codecs.lookup(stream.encoding).name != "ascii"  # click would rewrap an "ascii" stream as UTF-8
    name = os.fsdecode("ベータ".encode()) if sys.getfilesystemencoding() == "ascii" else \
        "ベータ".encode().decode("ascii", "surrogateescape")
    stream.write(f"Δ {name} ×")
    stream.flush()
    assert raw.getvalue() == b"d " + "ベータ".encode() + b" x"


def test_utf8_streams_are_left_alone():
    raw, stream = _stream("utf-8")
    assert not text.make_safe(stream)
    assert stream.errors == "strict"


def test_text_from_the_os_becomes_utf8_text_and_paths_from_utf8_text_reach_the_os():
    escaped = "ベータ Δ.safetensors".encode().decode("ascii", "surrogateescape")
    assert text.from_os(escaped) == "ベータ Δ.safetensors"
    assert text.from_os("plain ✓") == "plain ✓"
    assert text.to_os("ベータ.safetensors") == "ベータ.safetensors"  # this OS encodes it: unchanged
    assert os.fsencode(text.to_os("ベータ.safetensors")) == "ベータ.safetensors".encode()


def test_ascii_fallback_covers_the_symbols_of_help_texts_and_docstrings():
    """Every non-ASCII character in the CLI's help texts and the methods' descriptions has a readable stand-in."""
    from mergekit_sdxl.cli.main import COMMANDS
    from mergekit_sdxl.methods.registry import METHODS

    samples = [desc for _, desc in COMMANDS.values()] + [m.doc for m in METHODS.values()]
    cli = ROOT / "mergekit_sdxl" / "cli"
    samples += [p.read_text(encoding="utf-8") for p in cli.glob("*.py")]
    missing = {c for s in samples for c in s if ord(c) > 127 and "\\" in text.ascii_fallback(c)
               and len(c.encode("cp1252", "ignore")) == 0}
    assert missing == set()


# devices ----------------------------------------------------------------------------------------------------
def test_mps_is_accepted_only_where_allowed_and_available(monkeypatch):
    pytest.importorskip("torch")  # scripts/check_pythons.sh runs this file where torch is missing
    import torch

    from mergekit_sdxl.engine.device import resolve_device
    from mergekit_sdxl.errors import DeviceError

    with pytest.raises(DeviceError, match="not supported here"):
        resolve_device("mps")  # commands that do not allow it (extract-lora, bake)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="no MPS device"):
        resolve_device("mps", allow_mps=True)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("mps", allow_mps=True) == torch.device("mps")
    assert resolve_device("auto", allow_mps=True).type in ("cpu", "cuda")  # auto never picks MPS


def test_mps_refuses_fp64_compute():
    pytest.importorskip("torch")  # scripts/check_pythons.sh runs this file where torch is missing
    import torch

    from mergekit_sdxl.engine.device import check_compute_dtype
    from mergekit_sdxl.errors import DeviceError

    with pytest.raises(DeviceError, match="fp64"):
        check_compute_dtype(torch.device("mps"), torch.float64)
    check_compute_dtype(torch.device("mps"), torch.float32)
    check_compute_dtype(torch.device("cpu"), torch.float64)


def test_sampler_on_mps_follows_the_gpu_dtype_rules(monkeypatch):
    pytest.importorskip("torch")  # scripts/check_pythons.sh runs this file where torch is missing
    import torch

    from mergekit_sdxl.cli import grid_cmd

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    slot = grid_cmd._slot("mps", "auto")
    assert slot.device.type == "mps" and slot.dtype == torch.float16 and slot.vae_dtype == torch.float32


def test_merge_on_a_machine_without_mps_is_a_device_error(tmp_path, capsys):
    torch = pytest.importorskip("torch")  # scripts/check_pythons.sh runs this file where torch is missing
    from mergekit_sdxl.cli.main import main
    from mergekit_sdxl.synth import write_test_checkpoint

    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    tiny_sdxl = tmp_path / "tiny.safetensors"
    write_test_checkpoint(tiny_sdxl, arch="sdxl", size="tiny", seed=0)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"models: {{a: {tiny_sdxl}}}\nsteps:\n  output: 'a'\n", encoding="utf-8")
    with pytest.raises(SystemExit) as exc:
        main(["merge", str(recipe), "--device", "mps", "-o", str(tmp_path / "out.safetensors")])
    assert exc.value.code == 5 and "no MPS device" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()


# signals ----------------------------------------------------------------------------------------------------
def test_ctrl_break_is_handled_like_ctrl_c_where_it_exists(monkeypatch):
    """Windows' SIGBREAK, emulated with SIGUSR1: the CLI's handler turns it into KeyboardInterrupt (exit 130)."""
    import signal

    from mergekit_sdxl.platform import signals

    if not hasattr(signal, "SIGUSR1"):
        pytest.skip("needs a spare POSIX signal to stand in for SIGBREAK")
    monkeypatch.setattr(signal, "SIGBREAK", signal.SIGUSR1, raising=False)
    assert signals.console_interrupts() == [signal.SIGINT, signal.SIGUSR1]
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        signals.handle_console_break()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGUSR1)
            for _ in range(100):  # the handler runs at the next bytecode boundary
                pass
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_stop_signals_are_those_that_exist():
    import signal

    from mergekit_sdxl.platform import signals

    expected = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    assert signals.stop_signals() == expected
    assert (signal.Signals["SIGHUP"] in signals.stop_signals()) == (not HIDDEN)  # the test mode hides SIGHUP


def test_a_replace_blocked_by_another_program_says_so():
    """Windows refuses to replace a file another program has open (WinError 5, 32, 33); the message must say
    what to do, not just "Access is denied"."""
    from mergekit_sdxl.platform.process import replace_failure

    blocked = PermissionError(13, "Access is denied")
    blocked.winerror = 32  # what Windows sets (sharing violation)
    message = replace_failure(blocked, "C:\\models\\merged.safetensors")
    assert "another program has it open" in message and "merged.safetensors" in message
    other = OSError(28, "No space left on device")
    assert replace_failure(other, "out.safetensors") == "out.safetensors: finishing the file failed: " \
                                                         "No space left on device"
