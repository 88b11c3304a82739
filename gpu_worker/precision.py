"""Which floating-point type a model runs in, and why.

``auto`` (the registry default) picks bfloat16 wherever the hardware computes it
natively: CUDA GPUs that support it (compute capability 8.0+), and CPUs with
AVX512-BF16 or AMX-BF16, where SmolLM2-135M decodes about 2.4x faster in bf16
than in fp32. On other CPUs torch emulates bf16 through fp32 conversions, which is
slower than fp32 itself, so ``auto`` keeps fp32 there. The registry's ``dtype``
or ``INFERSTACK_DTYPE`` pin a type instead; the worker logs the choice and the
reason when it loads a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}  # float64: exact arithmetic, for tests that compare token for token

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
"""x86 CPU flags (``/proc/cpuinfo``) under which bf16 matmuls run natively (oneDNN)."""


@dataclass(frozen=True, slots=True)
class DtypeChoice:
    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo does not exist, e.g. macOS)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def native_bf16_flags(flags: set[str] | None = None) -> list[str]:
    flags = cpu_flags() if flags is None else flags
    return [f for f in NATIVE_BF16_FLAGS if f in flags]


def choose_dtype(device: torch.device, registry: str = "auto", override: str | None = None, *,
                 flags: set[str] | None = None) -> DtypeChoice:
    """``override`` (``INFERSTACK_DTYPE``) wins over the ``registry`` dtype; ``auto``
    follows the hardware. ``flags`` replaces the CPU's own flags (tests)."""
    name, source = (override, "INFERSTACK_DTYPE") if override else (registry, "registry dtype")
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r} ({source}); use auto, {', '.join(DTYPES)}")
        if device.type == "cpu" and name == "float16":
            return DtypeChoice(torch.float32, f"{source} float16 is for GPUs; CPUs lack most half kernels")
        return DtypeChoice(DTYPES[name], f"pinned by the {source}")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return DtypeChoice(torch.bfloat16, "auto: the GPU computes bf16 natively")
        return DtypeChoice(torch.float16, "auto: the GPU has no native bf16 (compute capability < 8.0)")
    if device.type == "cpu":
        native = native_bf16_flags(flags)
        if native:
            return DtypeChoice(torch.bfloat16, f"auto: the CPU computes bf16 natively ({', '.join(native)})")
        return DtypeChoice(torch.float32, "auto: the CPU has no native bf16 (no avx512_bf16 or amx_bf16), "
                                          "so bf16 would be emulated and slower than fp32")
    return DtypeChoice(torch.float32, f"auto: float32 on {device.type}")
