"""What this machine's CPU can do, as far as the INT8 kernels care."""
from __future__ import annotations

import platform
from pathlib import Path

# x86 instructions that add u8 x s8 products straight into int32 (no saturating int16 step)
INT8_DOT_PRODUCT = ("avx512_vnni", "avx_vnni", "amx_int8")


def x86_flags(text: str | None = None) -> set[str] | None:
    """The CPU flags Linux reports (in `text`, /proc/cpuinfo's content when already read);
    None where they cannot be read (another OS)."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    return set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))


def is_x86(machine: str | None = None) -> bool:
    return (machine or platform.machine()).lower() in ("x86_64", "amd64", "i386", "i686", "x86")


def is_arm(machine: str | None = None) -> bool:
    m = (machine or platform.machine()).lower()
    return m in ("aarch64", "arm64") or m.startswith("arm")


def int8_sums_saturate(machine: str | None = None, flags: set[str] | None = None) -> bool:
    """True on x86 CPUs without VNNI or AMX: their INT8 matrix kernels (VPMADDUBSW) add each
    pair of u8 x s8 products into a saturating int16. Unknown flags on x86 count as True
    (the safe side: float where it matters, see openvino_int8.float_attention_products)."""
    if not is_x86(machine):
        return False
    flags = x86_flags() if flags is None else flags
    return flags is None or not any(f in flags for f in INT8_DOT_PRODUCT)
