"""What this machine is and what it is fast at: device, dtype, threads, memory."""

import os
import platform
import resource
import sys
from functools import lru_cache

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bf16": the spelling configs use."""
    return {v: k for k, v in DTYPES.items()}[dtype]


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run several times faster than fp32 (FACTS.md: ~5x here)."""
    if platform.machine() == "arm64" and sys.platform == "darwin":
        return False  # Apple CPUs: fp32 via Accelerate is the fast path for torch
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def slow_dtype_warning(device_type: str, compute_dtype: torch.dtype, bf16_weights: bool = False) -> str | None:
    """The warning a run prints when it asks a CPU for a dtype it emulates (fp16; bf16 without a bf16
    unit), else None."""
    if device_type == "cpu" and compute_dtype == torch.float16:
        return ("[yellow]warning:[/] model.dtype fp16 on a CPU: CPUs emulate fp16 matmuls (a LoRA run of SmolLM2-135M "
                "trained at 7 tokens/s here, against ~500 in bf16). fp16 is for GPUs without bf16; set model.dtype: "
                "auto unless fp16 is what you are testing")
    if device_type != "cpu" or cpu_has_fast_bf16() or not (compute_dtype == torch.bfloat16 or bf16_weights):
        return None
    return ("[yellow]warning:[/] this CPU has no fast bf16 unit (AVX512-BF16 or AMX): its bf16 matmuls run at "
            "1/50 of its fp32 rate or less (bench/RESULTS.md, 'Without a fast bf16 unit'). Set model.dtype: auto "
            "(fp32 here)" + (" and train.weight_dtype: fp32" if bf16_weights else "") + " unless bf16 is what you "
            "are testing")


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def resolve_dtype(name: str, dev: "torch.device | None" = None) -> torch.dtype:
    """'auto' picks bf16 where the hardware is fast at it (CUDA with bf16, CPU with AVX512-BF16 or
    AMX), fp16 on older GPUs (V100, T4: their tensor cores run fp16, and training scales the loss for
    it, training/loss_scaling.py) and fp32 otherwise; any other name maps directly."""
    if name != "auto":
        return DTYPES[name]
    dev = dev or device()
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dev.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


def physical_cores() -> int:
    """Cores this process may use, counting hyper-threads once (torch is fastest at one thread per core)."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    pairs, siblings = set(), None
    try:
        with open("/proc/cpuinfo") as f:
            phys = None
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    pairs.add((phys, line.split(":")[1].strip()))
                elif line.startswith("siblings") and siblings is None:
                    siblings = int(line.split(":")[1])
    except OSError:
        pass
    cores = len(pairs) or allowed
    return max(1, min(allowed, cores))


def set_threads(n: int | None) -> int:
    """torch's CPU threads: n, else this machine's physical cores shared among the training processes
    a launcher (torchrun, accelerate launch) started on it, so they do not fight over the same cores."""
    n = n or max(1, physical_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(n)
    return n


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 1024 / 1024


def total_ram_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError):
        return 0.0


def describe_hardware() -> dict:
    info = {"device": device().type, "cpu_cores": physical_cores(), "ram_gb": round(total_ram_gb(), 1),
            "cpu_fast_bf16": cpu_has_fast_bf16(), "auto_dtype": str(resolve_dtype("auto")).replace("torch.", "")}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info
