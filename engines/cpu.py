"""What this CPU's int8 kernels do to a quantised graph.

ONNX Runtime runs an int8 convolution as uint8 activations times int8 weights. On x86-64 CPUs
without VNNI (AVX2, or AVX-512 without VNNI) its kernels multiply with VPMADDUBSW, which adds each
pair of products in 16 bits and saturates: with weights in the full 8-bit range ([-127, 127]) a
pair can reach 2 x 255 x 127 = 64,770 > 32,767, and the scores change (v10 on a 2-core AMD EPYC:
validation AUC 0.9875 on VNNI CPUs, 0.9716 there). Weights in 7 bits ([-64, 63]) cannot saturate
(2 x 255 x 64 = 32,640), so `cyborg export --precision int8` writes 7-bit weights by default; for a
graph with 8-bit weights, ONNX Runtime's session option `session.x64quantprecision` switches such
CPUs to exact (and slower) uint8 x uint8 kernels.
"""

from __future__ import annotations

import platform
from pathlib import Path

VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni"})  # /proc/cpuinfo names of the 8-bit dot-product instructions
SATURATION_FREE_WEIGHT_BITS = 7  # the widest signed weights whose u8 x s8 pair sums fit in 16 bits
EXACT_INT8_ENTRY = "session.x64quantprecision"  # ONNX Runtime: u8u8 instead of u8s8 kernels where u8s8 can overflow


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str] | None:
    """The first processor's feature flags (Linux), or None where they cannot be read."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return None


def is_x86(machine: str | None = None) -> bool:
    """True on an x86-64 machine (this one, unless `machine` names another)."""
    return (machine or platform.machine()).lower() in ("x86_64", "amd64")


def int8_pairs_saturate(flags: frozenset[str] | None = None, machine: str | None = None) -> bool:
    """True on an x86-64 CPU whose flags lack VNNI: its int8 kernels saturate with 8-bit weights.
    False elsewhere (ARM's dot-product kernels add in 32 bits) and where the flags are unknown."""
    if not is_x86(machine):
        return False
    flags = cpu_flags() if flags is None else flags
    return flags is not None and not (flags & VNNI_FLAGS)


def int8_kernels(flags: frozenset[str] | None = None, machine: str | None = None) -> str:
    """How this CPU adds int8 products, in words (recorded beside int8 figures measured on it)."""
    if not is_x86(machine):
        return (machine or platform.machine()).lower() or "unknown"
    flags = cpu_flags() if flags is None else flags
    if flags is None:
        return "x86-64 (flags unknown)"
    return "x86-64 without VNNI (16-bit pair sums: 8-bit weights saturate)" if int8_pairs_saturate(flags, machine) else "x86-64 with VNNI"


def exact_int8_entries(weight_bits: int) -> dict[str, str]:
    """ONNX Runtime session config entries that keep an int8 graph with `weight_bits`-bit weights exact
    on this CPU: none where it cannot saturate (7-bit weights, VNNI, ARM)."""
    if weight_bits > SATURATION_FREE_WEIGHT_BITS and int8_pairs_saturate():
        return {EXACT_INT8_ENTRY: "1"}
    return {}
