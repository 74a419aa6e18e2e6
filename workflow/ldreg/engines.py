"""Which inference engines this CPU runs natively: the one rule that ``register``, the speed
profile (models and machine throughput), evaluation and the configs share.

An engine is a convolution precision and a memory layout. float32 runs natively everywhere.
bfloat16 runs on the CPU's bf16 units (AMX or AVX512-BF16) where it has them; elsewhere oneDNN
emulates it, 10-20x slower than float32 (one 16-channel 3x3x3 conv at 32^3 on an AVX2-only EPYC:
0.09 s float32, 1.45 s bfloat16), so an emulated engine is never run: it is skipped with a note.

``LDREG_BF16_UNITS=1`` (or ``0``) forces the answer: for tests, and for a user who knows better
than /proc/cpuinfo (a hypervisor hiding flags). Subprocesses inherit it. oneDNN's own cap,
``ONEDNN_MAX_CPU_ISA``, is honoured too: held below AVX512_CORE_BF16 (``AVX2``, say, to see what an
AVX2-only CPU would do), oneDNN emulates bf16 whatever the CPU has, so bf16 counts as emulated.
"""
from __future__ import annotations

import functools
import logging
import os
import platform
from pathlib import Path

log = logging.getLogger(__name__)

# engine name -> (convolution precision, channels-last 3D)
ENGINES = {"float32": ("float32", False), "float32_cl": ("float32", True), "bfloat16_cl": ("bfloat16", True)}
FORCE_BF16_ENV = "LDREG_BF16_UNITS"
_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) below the first with bf16 dot products
ONEDNN_ISA_ENV = "ONEDNN_MAX_CPU_ISA"
_ISAS_WITHOUT_BF16 = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE",
                                "AVX512_CORE_VNNI"})


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset]:
    """(model name, flags) of the first CPU in /proc/cpuinfo; elsewhere the platform's name and
    no flags (so bf16 counts as emulated: the safe answer)."""
    name, flags = "", frozenset()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not name:
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = frozenset(value.split())
    except OSError:
        pass
    return name or platform.processor() or "unknown CPU", flags


def cpu_name() -> str:
    return _cpuinfo()[0]


def cpu_features() -> dict[str, bool]:
    """The features that decide CPU inference speed here (the bf16 answer honours the override)."""
    flags = _cpuinfo()[1]
    return {"avx2": "avx2" in flags, "avx512": "avx512f" in flags, "amx": "amx_bf16" in flags,
            "bf16_units": bf16_units()}


def bf16_units() -> bool:
    """Whether bfloat16 convolutions run on hardware units (AMX or AVX512-BF16)."""
    forced = os.environ.get(FORCE_BF16_ENV)
    if forced is not None and forced.strip() != "":
        if forced.strip() not in ("0", "1"):
            raise ValueError(f"{FORCE_BF16_ENV} must be 0 or 1, got {forced!r}")
        return forced.strip() == "1"
    if os.environ.get(ONEDNN_ISA_ENV, "").strip().upper() in _ISAS_WITHOUT_BF16:
        return False
    return any(flag in _cpuinfo()[1] for flag in _BF16_FLAGS)


def cpu_summary() -> str:
    """The CPU's name and the features that matter, for every speed table and note:
    'Intel(R) Xeon(R) ... [avx2, avx512, no amx, no bf16 units]'."""
    feats = cpu_features()
    words = [("" if feats[k] else "no ") + k.replace("_", " ") for k in ("avx2", "avx512", "amx", "bf16_units")]
    forced = " (bf16 answer forced by LDREG_BF16_UNITS)" if os.environ.get(FORCE_BF16_ENV, "").strip() else ""
    isa = os.environ.get(ONEDNN_ISA_ENV, "").strip()
    if isa:
        forced += f" (oneDNN held to {isa})"
    return f"{cpu_name()} [{', '.join(words)}]{forced}"


def engine_spec(name: str) -> tuple[str, bool]:
    """(precision, channels_last) of an engine name."""
    if name not in ENGINES:
        raise ValueError(f"unknown inference engine {name!r}; known: {sorted(ENGINES)}")
    return ENGINES[name]


def precision_native(precision: str) -> bool:
    if precision == "float32":
        return True
    if precision == "bfloat16":
        return bf16_units()
    raise ValueError(f"unknown precision {precision!r}: expected 'float32' or 'bfloat16'")


def skip_reason(precision: str) -> str:
    return (f"skipped: {precision} would be emulated on this CPU (no AMX / AVX512-BF16 units), "
            f"10-20x slower than float32")


def native_engines(names) -> tuple[list[str], dict[str, str]]:
    """The engines of ``names`` this CPU runs natively, in order, and the skipped ones with why
    (each skip is logged)."""
    kept, skipped = [], {}
    for name in names:
        precision = engine_spec(name)[0]
        if precision_native(precision):
            kept.append(name)
        else:
            skipped[name] = skip_reason(precision)
            log.info("engine %s %s", name, skipped[name])
    return kept, skipped


def default_precision(device: str = "cpu") -> str:
    """bfloat16 on CPUs with bf16 units (fields within 1e-4 mean Dice of float32 in the speed
    profile), float32 elsewhere and on GPUs."""
    return "bfloat16" if device == "cpu" and bf16_units() else "float32"


def device_for(name: str = "auto"):
    """The torch device a job runs on: ``auto`` is CUDA where torch sees a GPU, else the CPU."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for but CUDA is not available")
    return torch.device(name)
