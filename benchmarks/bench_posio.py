"""Benchmark: the positional I/O strategies of `mergekit_sdxl.io.posio` on a file laid out like a full SDXL.

The file holds the first `--gigabytes` of the full-size SDXL fp16 tensors (real sizes, in storage order) and is
read back tensor by tensor into fresh buffers, as the engine's reader thread does, by each strategy: `pread`
(os.preadv), `locked` (one handle, lock + seek + readinto), `handles` (a handle per thread), `mmap` (copy out of
a read-only map); once with one reading thread and once with two threads splitting the tensors. Writes: `pread`
(os.pwrite) against `locked` (seek + write), the tensors in storage order into a new preallocated file. The file
is written just before, so reads come from the page cache: this measures what the strategies themselves cost,
not the disk (the end-to-end merge with the fallback is `bench_merge.py --fallback`). Before timing, every
strategy's bytes are checked against each other (single and two threads). The order of the strategies rotates from
round to round. One JSON line per measurement, then a summary with medians and ratios to `pread`.

    python benchmarks/bench_posio.py --gigabytes 2 --rounds 3
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, emit, summary  # noqa: E402

from mergekit_sdxl.engine.memory import empty_bytes  # noqa: E402
from mergekit_sdxl.io.posio import NATIVE, PositionalFile  # noqa: E402
from mergekit_sdxl.io.writer import safetensors_order  # noqa: E402
from mergekit_sdxl.synth.checkpoints import plan_test_checkpoint  # noqa: E402

READERS = ("pread", "locked", "handles", "mmap")
WRITERS = ("pread", "locked")


def layout(limit: int) -> list[tuple[int, int]]:
    """(offset, nbytes) of the full SDXL's fp16 tensors in storage order, up to `limit` bytes."""
    out, cursor = [], 0
    for spec in safetensors_order(plan_test_checkpoint("sdxl", "full")):
        if cursor + spec.nbytes > limit:
            break
        out.append((cursor, spec.nbytes))
        cursor += spec.nbytes
    return out


def write_data(path: Path, size: int) -> str:
    block = os.urandom(16 << 20)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            part = block[: min(len(block), left)]
            f.write(part)
            digest.update(part)
            left -= len(part)
    return digest.hexdigest()


def read_all(path: Path, strategy: str, parts: list[tuple[int, int]], threads: int, check: bool = False
             ) -> tuple[float, str | None]:
    """Seconds to read every tensor into a fresh buffer; with `check`, also the sha256 of the tensors' sha256s in
    file order (then the time includes hashing and is not reported)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    digests: dict[int, bytes] = {}
    with PositionalFile(fd, strategy, path=path) as f:  # type: ignore[arg-type]
        def work(mine: list[tuple[int, int]]) -> None:
            for offset, nbytes in mine:
                buf = empty_bytes(nbytes)
                f.readinto(memoryview(buf.numpy()).cast("B"), offset)
                if check:
                    digests[offset] = hashlib.sha256(buf.numpy()).digest()
        start = time.perf_counter()
        workers = [threading.Thread(target=work, args=(parts[k::threads],)) for k in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        seconds = time.perf_counter() - start
    if not check:
        return seconds, None
    digest = hashlib.sha256()
    for offset, _ in parts:
        digest.update(digests[offset])
    return seconds, digest.hexdigest()


def write_all(path: Path, strategy: str, parts: list[tuple[int, int]], size: int) -> float:
    data = os.urandom(max(n for _, n in parts))
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    with PositionalFile(fd, strategy, writable=True) as f:  # type: ignore[arg-type]
        os.ftruncate(f.fd, size)
        start = time.perf_counter()
        for offset, nbytes in parts:
            f.write(memoryview(data)[:nbytes], offset)
        seconds = time.perf_counter() - start
    path.unlink()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gigabytes", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=ROOT / "bench-out" / "posio")
    args = parser.parse_args()
    if not NATIVE:
        sys.exit("this benchmark compares the fallbacks with os.pread: run it where os.pread exists")
    args.work.mkdir(parents=True, exist_ok=True)
    parts = layout(int(args.gigabytes * 1e9))
    size = parts[-1][0] + parts[-1][1]
    data = args.work / "data.bin"
    write_data(data, size)
    digests = {strategy: read_all(data, strategy, parts, threads, check=True)[1]
               for strategy in READERS for threads in (1, 2)}
    if len(set(digests.values())) != 1:
        sys.exit(f"the strategies read different bytes: {digests}")
    results: dict[str, list[float]] = {}
    for rnd in range(args.rounds):
        order = READERS[rnd % len(READERS):] + READERS[:rnd % len(READERS)]  # rotated: no strategy always first
        for threads in (1, 2):
            for strategy in order:
                seconds, _ = read_all(data, strategy, parts, threads)
                results.setdefault(f"read {strategy} x{threads}", []).append(seconds)
                emit({"what": f"read {strategy}", "threads": threads, "round": rnd, "seconds": seconds,
                      "gb_per_s": size / 1e9 / seconds, "tensors": len(parts), "bytes": size})
        for strategy in WRITERS if rnd % 2 == 0 else WRITERS[::-1]:
            seconds = write_all(args.work / "out.bin", strategy, parts, size)
            results.setdefault(f"write {strategy}", []).append(seconds)
            emit({"what": f"write {strategy}", "round": rnd, "seconds": seconds, "gb_per_s": size / 1e9 / seconds})
    data.unlink()
    line: dict[str, object] = {"what": "summary", "bytes": size, "tensors": len(parts), "rounds": args.rounds}
    for name, values in results.items():
        line[name] = summary(values)
        base = name.replace(name.split()[1], "pread")
        line[f"{name} / {base}"] = round(summary(values)["median"] / summary(results[base])["median"], 3)
    emit(line)


if __name__ == "__main__":
    main()
