"""tunelab's own CPU kernels (csrc/*.cpp): built on first use on this machine, cached, optional.

torch.utils.cpp_extension compiles them with the C++ compiler that torch.compile already needs on a
CPU, against the installed torch, into ~/.cache/torch_extensions (TORCH_EXTENSIONS_DIR), once per
machine and source version (~15 s). Where they cannot be built or used (no compiler, a CPU without
AVX2, bf16 without AMX or AVX512-BF16, TUNELAB_CPU_KERNELS=0), `attention_kernels` says why once and
attention.py keeps its pure-PyTorch path: the kernels change speed, never what a run can do.
"""

import functools
import os
import shutil
import time
from pathlib import Path

import torch

from tunelab.hardware import cpu_flags
from tunelab.log import info

SOURCES = [Path(__file__).parent / "csrc" / "packed_attention.cpp"]

# the instruction sets torch's own kernels of each level use; the name keeps builds for different
# CPUs apart when several machines share one home directory
_ARCH_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"],
}


def attention_kernels(dtype: torch.dtype, head_dim: int):
    """The fused packed-attention kernels (`.packed_attention_forward`, `.packed_attention_backward`)
    for `dtype` on this machine, or None (the reason said once)."""
    if dtype == torch.bfloat16 and head_dim % 16:
        return None  # AMX tiles take 16-column blocks
    if dtype == torch.bfloat16 and not bf16_tile_products():
        _say_once("tunelab's fused attention kernels need AMX or AVX512-BF16 for bf16; using the PyTorch path")
        return None
    if dtype not in (torch.bfloat16, torch.float32) or not _load():
        return None
    return torch.ops.tunelab_kernels


def bf16_tile_products() -> bool:
    """Whether this CPU multiplies bf16 tiles in hardware: AMX (oneDNN's brgemm), or AVX512-BF16's
    pair dot products (the kernels' own micro-kernel, for AMD Zen 4/5 and CPUs without AMX)."""
    flags = cpu_flags()
    return "amx_bf16" in flags or ("avx512_bf16" in flags and torch.backends.cpu.get_cpu_capability() == "AVX512")


def missing_prerequisite() -> "str | None":
    """Why the kernels cannot be built here (turned off, CPU, compiler), or None if they can."""
    if os.environ.get("TUNELAB_CPU_KERNELS", "1") == "0":
        return "TUNELAB_CPU_KERNELS=0"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in _ARCH_FLAGS:
        return f"tunelab's CPU kernels need AVX2 or AVX-512 (this CPU: {capability})"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) for tunelab's CPU kernels (install g++ for ~30-60% faster training)"
    return None


@functools.cache
def _load() -> bool:
    missing = missing_prerequisite()
    if missing:
        if not missing.startswith("TUNELAB_CPU_KERNELS"):
            _say_once(f"{missing}; using PyTorch paths")
        return False
    from torch.utils.cpp_extension import load

    capability = torch.backends.cpu.get_cpu_capability()
    started = time.perf_counter()
    try:
        load(name=f"tunelab_kernels_{capability.lower()}", sources=[str(s) for s in SOURCES],
             extra_cflags=["-O3", "-fopenmp", f"-DCPU_CAPABILITY={capability}", *_ARCH_FLAGS[capability]],
             extra_ldflags=["-fopenmp"], is_python_module=False)
    except Exception as e:  # a failed build must not stop training: the PyTorch path is always there
        lines = str(e).strip().splitlines() or [type(e).__name__]
        first_error = next((line for line in lines if "error" in line), lines[-1])  # the compiler's, not ninja's
        _say_once(f"could not build tunelab's CPU kernels ({first_error[:300]}); using PyTorch paths")
        return False
    seconds = time.perf_counter() - started
    if seconds > 2:  # a build, not a cache hit
        info(f"[dim]built tunelab's CPU kernels in {seconds:.0f} s "
             "(once: later runs load them from ~/.cache/torch_extensions)[/dim]")
    return True


@functools.cache
def _say_once(message: str) -> None:
    info(f"[dim]{message}[/dim]")
