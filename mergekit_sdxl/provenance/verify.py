"""`merge --verify-against FILE`: compare a merge with a published file tensor by tensor, in ulps.

For every key, the distance between our value and the published one is |ours - published| divided by the unit
in the last place (of the published tensor's dtype: fp16 for fp16 files) at max(|ours|, |published|), so one
rounding step of difference is 1 (0.5 across a power of two) and bit-identical values are 0. Reported per MBW
block (UNet) or component, with the AutoV3 of both files: equal AutoV3 means byte-identical tensor data.
Tensors are read one pair at a time and compared in chunks, so memory stays at two tensors.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergekit_sdxl.arch.blocks import block_of
from mergekit_sdxl.arch.detect import component_of, detect_arch
from mergekit_sdxl.arch.registry import arch_spec
from mergekit_sdxl.dtypes import is_float, name_of
from mergekit_sdxl.errors import ArchError
from mergekit_sdxl.io.dtypes import torch_dtype
from mergekit_sdxl.io.hashes import hashes_for
from mergekit_sdxl.io.reader import SafetensorsReader

CHUNK = 1 << 20
_COMPONENT_LABELS = {"clip_l": "CLIP-L", "clip_g": "CLIP-G", "vae": "VAE", "ema": "EMA", "other": "other"}


@dataclass
class GroupDiff:
    """One block or component: keys compared, the largest distance in ulps, elements over the tolerance."""

    keys: int = 0
    elements: int = 0
    max_ulps: float = 0.0
    over: int = 0
    differing_keys: int = 0


@dataclass
class VerifyReport:
    """Everything `verify` found; `passed` is the verdict."""

    ours: str
    published: str
    unit: str
    tolerance: float
    groups: dict[str, GroupDiff] = field(default_factory=dict)
    only_ours: list[str] = field(default_factory=list)
    only_published: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)
    dtype_mismatch: list[str] = field(default_factory=list)
    autov3_ours: str | None = None
    autov3_published: str | None = None
    same_order: bool = True

    @property
    def max_ulps(self) -> float:
        return max((g.max_ulps for g in self.groups.values()), default=0.0)

    @property
    def identical(self) -> bool:
        return self.max_ulps == 0 and not (self.only_ours or self.only_published or self.shape_mismatch)

    @property
    def passed(self) -> bool:
        return self.max_ulps <= self.tolerance and not (self.only_ours or self.only_published
                                                         or self.shape_mismatch)

    @property
    def verdict(self) -> str:
        if self.identical and self.dtype_mismatch:
            return (f"every value equals the published file's ({len(self.dtype_mismatch)} key(s) stored in another "
                    "dtype)")
        if self.identical:
            return "every tensor is bit-identical to the published file"
        if self.passed:
            return f"reproduced within {_ulps(self.max_ulps)} {self.unit} (rounding differences only)"
        return f"NOT reproduced: {_why(self)}"

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form (ulps as numbers; inf as null)."""
        return {"published": self.published, "unit": self.unit, "tolerance": self.tolerance,
                "passed": self.passed, "identical": self.identical, "max_ulps": _number(self.max_ulps),
                "autov3_ours": self.autov3_ours, "autov3_published": self.autov3_published,
                "autov3_match": self.autov3_ours == self.autov3_published,
                "groups": {name: {"keys": g.keys, "max_ulps": _number(g.max_ulps), "over": g.over}
                           for name, g in self.groups.items()},
                "only_ours": self.only_ours, "only_published": self.only_published,
                "shape_mismatch": self.shape_mismatch, "dtype_mismatch": self.dtype_mismatch,
                "verdict": self.verdict}


def verify(ours: str | Path, published: str | Path, tolerance: float = 1.0,
           progress: Callable[[int], None] | None = None) -> VerifyReport:
    """Compare the file `ours` with `published` (both safetensors), tensor by tensor.

    Raises:
        CheckpointError: either file is unreadable or malformed.
    """
    with SafetensorsReader(ours) as mine, SafetensorsReader(published) as theirs:
        unit = _unit(theirs)
        report = VerifyReport(str(ours), str(published), unit, float(tolerance))
        arch = _arch(theirs)
        theirs_keys = set(theirs.keys())
        report.only_ours = [k for k in mine.keys() if k not in theirs_keys]
        report.only_published = [k for k in theirs.keys() if k not in mine]
        shared = [k for k in mine.keys() if k in theirs_keys]
        report.same_order = shared == [k for k in theirs.keys() if k in set(shared)]
        digest = hashlib.sha256()
        for key in mine.keys():  # our file order: our AutoV3 is hashed on the way
            a = mine.read(key)
            digest.update(_raw(a))
            if key in theirs_keys:
                _compare(report, key, a, theirs, arch)
            if progress is not None:
                progress(mine.info(key).nbytes)
        report.autov3_ours = digest.hexdigest()
    report.autov3_published = hashes_for(published).autov3
    return report


def _compare(report: VerifyReport, key: str, a: torch.Tensor, theirs: SafetensorsReader, arch: str | None) -> None:
    b = theirs.read(key)
    group = report.groups.setdefault(_group(key, arch), GroupDiff())
    group.keys += 1
    if tuple(a.shape) != tuple(b.shape):
        report.shape_mismatch.append(f"{key} (ours {list(a.shape)}, published {list(b.shape)})")
        return
    if a.dtype != b.dtype:
        report.dtype_mismatch.append(f"{key} (ours {a.dtype}, published {b.dtype})".replace("torch.", ""))
    group.elements += a.numel()
    worst, over = distance(a, b, theirs.info(key).dtype, report.tolerance)
    group.max_ulps = max(group.max_ulps, worst)
    group.over += over
    group.differing_keys += worst > 0


def distance(a: torch.Tensor, b: torch.Tensor, dtype: str, tolerance: float) -> tuple[float, int]:
    """(largest distance in ulps of `dtype`, elements farther than `tolerance`) between two same-shape tensors.

    Non-float tensors: 0 if equal, else inf. NaN equals NaN; infinities equal only themselves.
    """
    fa, fb = a.reshape(-1), b.reshape(-1)
    if not is_float(dtype):
        equal = torch.equal(fa.to(torch.int64) if not fa.is_floating_point() else fa,
                            fb.to(torch.int64) if not fb.is_floating_point() else fb)
        return (0.0, 0) if equal else (math.inf, int((fa != fb).sum()))
    bits, emin = _format(dtype)
    worst, over = 0.0, 0
    for start in range(0, fa.numel(), CHUNK):
        x = fa[start:start + CHUNK].double()
        y = fb[start:start + CHUNK].double()
        same = (x == y) | (torch.isnan(x) & torch.isnan(y))
        if bool(same.all()):
            continue
        scale = torch.maximum(x.abs(), y.abs())
        _, exponent = torch.frexp(scale)
        ulp = torch.ldexp(torch.ones_like(scale), (exponent - 1).clamp(min=emin) - bits)
        ulps = ((x - y).abs() / ulp).nan_to_num(nan=math.inf)
        ulps[same] = 0.0
        worst = max(worst, float(ulps.max()))
        over += int((ulps > tolerance).sum())
    return worst, over


def _format(dtype: str) -> tuple[int, int]:
    """(explicit mantissa bits, exponent of the smallest normal) of a float dtype: the ulp at |x| is
    2^(max(floor(log2 |x|), emin) - bits)."""
    finfo = torch.finfo(torch_dtype(dtype))
    return round(-math.log2(finfo.eps)), round(math.log2(finfo.smallest_normal))


def _raw(t: torch.Tensor) -> memoryview:
    return t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else memoryview(b"")


def _unit(reader: SafetensorsReader) -> str:
    weights: dict[str, int] = {}
    for entry in reader.infos():
        if is_float(entry.dtype):
            weights[entry.dtype] = weights.get(entry.dtype, 0) + entry.nbytes
    main = max(weights, key=weights.__getitem__) if weights else "F16"
    return f"{name_of(main)} ulps"


def _arch(reader: SafetensorsReader) -> str | None:
    try:
        return detect_arch(reader.keys(), str(reader.path))
    except ArchError:
        return None


def _group(key: str, arch: str | None) -> str:
    if arch is None:
        return "all"
    component = component_of(key, arch)
    if component == "unet":
        return block_of(key, arch, "supermerger") or "UNet other"
    if component == "clip_l" and not arch_spec(arch).dual_text_encoder:  # the only text encoder
        return "CLIP"
    return _COMPONENT_LABELS.get(component, component)


def _group_order(name: str) -> tuple[int, int, str]:
    """Components first (text encoders, VAE), then UNet blocks in MBW order (IN, M, OUT), then the rest."""
    head = ("CLIP", "CLIP-L", "CLIP-G", "VAE", "EMA")
    if name in head:
        return (0, head.index(name), name)
    prefix, digits = name.rstrip("0123456789"), name[len(name.rstrip("0123456789")):]
    if prefix in ("IN", "M", "OUT") and digits:
        return (1, ("IN", "M", "OUT").index(prefix) * 100 + int(digits), name)
    return (2, 0, name)


def report_lines(report: VerifyReport) -> list[str]:
    """Human lines: a table per group, then key differences, AutoV3 and the verdict."""
    lines = [f"verify against {report.published} (distance in {report.unit}; tolerance {report.tolerance:g})",
             f"{'group':<12} {'keys':>6} {'max ulps':>10} {'over tol.':>10}"]
    for name, g in sorted(report.groups.items(), key=lambda item: _group_order(item[0])):
        lines.append(f"{name:<12} {g.keys:>6} {_ulps(g.max_ulps):>10} {g.over:>10}")
    for label, keys in (("only in ours", report.only_ours), ("only in the published file", report.only_published),
                        ("shape differs", report.shape_mismatch), ("dtype differs", report.dtype_mismatch)):
        if keys:
            lines.append(f"{len(keys)} key(s) {label}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}")
    lines.append(_autov3_line(report))
    lines.append(f"result: {report.verdict}")
    return lines


def _autov3_line(report: VerifyReport) -> str:
    ours, theirs = (report.autov3_ours or "-")[:12], (report.autov3_published or "-")[:12]
    if report.autov3_ours == report.autov3_published:
        return f"AutoV3: {ours} matches (byte-identical tensor data)"
    why = ""
    if report.identical:
        why = " (same values; the tensors are stored " + ("in another order" if not report.same_order
                                                          else "in other dtypes") + ")"
    return f"AutoV3: ours {ours}, published {theirs}: differ{why}"


def _why(report: VerifyReport) -> str:
    parts = []
    if report.max_ulps > report.tolerance:
        worst = max(report.groups.items(), key=lambda item: item[1].max_ulps)
        over = sum(g.over for g in report.groups.values())
        parts.append(f"{over} value(s) beyond {report.tolerance:g} ulps, worst {_ulps(worst[1].max_ulps)} in "
                     f"{worst[0]}")
    for label, keys in (("only in ours", report.only_ours), ("missing", report.only_published),
                        ("with another shape", report.shape_mismatch)):
        if keys:
            parts.append(f"{len(keys)} key(s) {label}")
    return "; ".join(parts)


def _number(value: float) -> float | None:
    return None if math.isinf(value) else value


def _ulps(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.3g}"
