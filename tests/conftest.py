"""Shared fixtures: synthetic SDXL / SD1.5 checkpoints with the real key names (see mergekit_sdxl.synth).

- `tiny_sdxl`, `tiny_sd15`: one tiny fp16 checkpoint each (seed 0), written once per session. Treat as read-only.
- `make_ckpt(arch="sdxl", seed=0, like=None, delta=None, dtype="F16", size="tiny", include_optional=False)`:
  writes (once per session and argument set) and returns the path of any synthetic checkpoint.
- `tiny_sdxl_family`: {"base8", "beta7", "anxl2", "anxl3"} -> paths of four related tiny SDXL models for the
  Kohaku-XL gamma recipes: beta7 = noise fine-tune of base8, anxl2 = noise fine-tune of base8, anxl3 = noise
  fine-tune of anxl2 (each relation `noise:0.05`, fp16).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

try:  # hypothesis is a test extra; the torch-free checks on other Pythons may run without it
    from hypothesis import settings as _hypothesis_settings
except ImportError:  # pragma: no cover
    _hypothesis_settings = None

if _hypothesis_settings is not None:
    # CI runs derandomised: the same examples every run, no example database carried between runs, so a failure is
    # a regression and never luck. HYPOTHESIS_PROFILE=explore searches with fresh random examples while developing.
    _hypothesis_settings.register_profile("ci", derandomize=True, database=None, deadline=None)
    _hypothesis_settings.register_profile("explore", derandomize=False, database=None, deadline=None,
                                          max_examples=1000)
    import os as _os

    _hypothesis_settings.load_profile(_os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config: pytest.Config) -> None:
    """In the portability test mode (tests/portable/sitecustomize.py) refuse to run unless the POSIX-only calls
    are really hidden: a missing PYTHONPATH entry would otherwise test the normal path under the mode's name."""
    import os

    if os.environ.get("MERGEKIT_TEST_HIDE_POSIX") == "1" and hasattr(os, "pread"):
        raise pytest.UsageError("MERGEKIT_TEST_HIDE_POSIX=1 but os.pread is still there: put tests/portable first "
                                "on PYTHONPATH (make test-portable does)")


@pytest.fixture(autouse=True, scope="session")
def _private_hash_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the tests' input hashes out of the user's real cache (~/.cache/mergekit-sdxl)."""
    import os

    os.environ["MERGEKIT_SDXL_CACHE_DIR"] = str(tmp_path_factory.mktemp("hash-cache"))


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session folder synthetic checkpoints are cached in."""
    return tmp_path_factory.mktemp("synth")


@pytest.fixture(scope="session")
def make_ckpt(synth_dir: Path) -> Callable[..., Path]:
    """Factory: `make_ckpt(arch="sdxl", seed=0, like=None, delta=None, dtype="F16", ...) -> Path` (cached)."""
    from mergekit_sdxl.synth import write_test_checkpoint

    cache: dict[tuple, Path] = {}

    def make(arch: str = "sdxl", seed: int = 0, like: Path | str | None = None, delta: str | None = None,
             dtype: str = "F16", size: str = "tiny", include_optional: bool | tuple[str, ...] = False) -> Path:
        optional = tuple(sorted(include_optional)) if isinstance(include_optional, (set, frozenset, list, tuple)) \
            else include_optional
        key = (arch, seed, str(like) if like is not None else None, delta, dtype, size, optional)
        if key not in cache:
            path = synth_dir / f"ckpt{len(cache):03d}_{arch}_{size}_s{seed}.safetensors"
            if like is None:
                write_test_checkpoint(path, arch=arch, size=size, seed=seed, dtype=dtype,
                                      include_optional=optional)
            else:
                write_test_checkpoint(path, seed=seed, dtype=dtype, like=like, delta=delta)
            cache[key] = path
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_sdxl(make_ckpt: Callable[..., Path]) -> Path:
    """A tiny fp16 SDXL checkpoint (seed 0): every key of a real release, small consistent shapes."""
    return make_ckpt("sdxl", seed=0)


@pytest.fixture(scope="session")
def tiny_sd15(make_ckpt: Callable[..., Path]) -> Path:
    """A tiny fp16 SD1.5 checkpoint (seed 0)."""
    return make_ckpt("sd15", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_family(make_ckpt: Callable[..., Path]) -> dict[str, Path]:
    """Four related tiny SDXL models named like the Kohaku-XL gamma inputs (see the module docstring)."""
    base8 = make_ckpt("sdxl", seed=8)
    anxl2 = make_ckpt(seed=2, like=base8, delta="noise:0.05")
    return {
        "base8": base8,
        "beta7": make_ckpt(seed=7, like=base8, delta="noise:0.05"),
        "anxl2": anxl2,
        "anxl3": make_ckpt(seed=3, like=anxl2, delta="noise:0.05"),
    }


@pytest.fixture
def chromium(tmp_path_factory: pytest.TempPathFactory):
    """A headless Chromium (tests/browser.py) with a fresh profile; `.ci/run` installs Debian's `chromium`.

    Without a browser on PATH the test fails in CI (CI=true) and is skipped on a developer machine, naming the
    install command."""
    import os

    from browser import INSTALL_HINT, Chromium, find_chromium

    if find_chromium() is None:
        if os.environ.get("CI"):
            pytest.fail(f"chromium is missing; .ci/run installs it ({INSTALL_HINT})")
        pytest.skip(f"chromium is not installed ({INSTALL_HINT})")
    with Chromium(tmp_path_factory.mktemp("chromium-profile")) as browser:
        yield browser
