"""Which floating-point formats this machine computes natively."""

from __future__ import annotations

from pathlib import Path

# CPU flags of native bf16 arithmetic: AVX-512 BF16 (Cooper Lake, Zen 4 and later) and AMX (Sapphire Rapids).
NATIVE_BF16_CPU_FLAGS = {"avx512_bf16", "amx_bf16"}


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """False where the CPU emulates bf16 (then about 3x slower than fp32); True where it cannot be told."""
    try:
        text = cpuinfo.read_text()
    except OSError:  # not Linux: leave the choice to the user
        return True
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & NATIVE_BF16_CPU_FLAGS)
