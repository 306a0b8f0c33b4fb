"""Training time: FLOPs per token from the architecture, over a device's effective rate.

This machine's rate is a quick matmul calibration (bf16 and fp32, ~1 s each), cached per CPU,
torch version and thread count; named devices use datasheet dense tensor-core figures. A training
step reaches only a share of the matmul peak (elementwise work, attention, small LoRA matmuls):
CPU_EFFICIENCY holds the shares measured on this loop by the CPU's bf16 matmul unit and the model's
width (bench/RESULTS.md, MFU), GPU_EFFICIENCY a typical share on GPUs.
"""

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from tunelab.planning.arch import Arch
from tunelab.planning.memory import Setup

# Model FLOPs per second / bf16 matmul peak that this loop reaches on a CPU, (uncompiled, compiled),
# by the CPU's bf16 matmul unit, the method and the model's hidden size: bench/train_speed.py
# --shape 135m / 360m / 1.7b, against the highest peak measured that day (bench/RESULTS.md, "MFU and
# the model's size" and "The model's size without AMX").
# - amx (Intel Xeon with AMX, 2026-12-05): tiles make the GEMMs so fast (peak 1.6-2.6 TFLOP/s on 2
#   cores) that the memory-bound work around them (norms, SiLU, the adapters' products, the loss's
#   softmax) takes most of a step, so the share is low and grows with the width. Full fine-tuning with
#   fp32 master weights grows little (its weight-gradient GEMMs run at about half the rate, its
#   optimizer passes over fp32 weights; 1.7b does not fit in 24 GB); its shares are from 2026-12-07,
#   when the loop had gained ~25% since ("On AMX again"), against the highest peak of those runs
#   (2370 GFLOP/s; a later run read 2619: the peak moves ~20% within an hour there). bf16 weights'
#   uncompiled share was not measured there: fp32's is taken, which errs long.
# - avx512 (AMD EPYC Zen 4 with AVX512-BF16, 2026-12-06, peak 405-435 GFLOP/s): a 4-5x lower peak
#   against the same memory traffic, so the GEMMs dominate and the share is high at every width;
#   compiling buys less (at 1.7b nothing: the eager step measured 2 points higher). bf16 weights'
#   uncompiled share was not measured: fp32's is taken.
# - avx512_wide (AMD EPYC Zen 5, 2026-12-06, peak 830-985 GFLOP/s; "The Zen 5 shares"): the same
#   flags as Zen 4, but 512-bit instructions run at full width, so the peak is 2.2x Zen 4's and the
#   shares sit between the two tables. cpu_matmul_unit tells it from Zen 4 by the measured rate per
#   core. The shares are each run's MFU against its own peak, the mean of two sessions where both
#   measured the row (135m lora compiled: 0.48-0.60 over three runs, the spread of a shared
#   machine). Uncompiled, bf16 weights are the slowest at 576 (0.37 against fp32's 0.43) and the
#   fastest at 2048 (0.71, 3 points above compiled, with 6 GB more memory).
# - fp32 (CPUs without a fast bf16 unit: AVX2, or AVX-512 without BF16, Apple): they emulate bf16
#   matmuls at 1/50 of their fp32 rate or less (AMD EPYC Zen 2, 2 cores: 1.4 GFLOP/s at n = 512,
#   0.16 at 2048, against fp32's 67-71), so `model.dtype: auto` trains in fp32 there and the shares
#   are of the fp32 peak (AMD EPYC Zen 2, AVX2, 2026-12-07, bench/RESULTS.md "Without a fast bf16
#   unit"): the lowest peak of all against the same memory traffic, so the GEMMs are nearly the
#   whole step. LoRA measured at 135M's and 360M's widths, full at 135M's only; held beyond them
#   (elsewhere wider models reach higher shares, so this errs long). bf16 weights compute in bf16:
#   their share of the fp32 peak is full's times the bf16/fp32 matmul ratio at n = 512 (0.79 x
#   1/47; not timed, a run would take hours); train warns before such a run.
# Between measured widths the share is interpolated on log(hidden); beyond them it stays at the
# nearest one.
CPU_EFFICIENCY = {
    "amx": {"lora": {576: (0.16, 0.26), 960: (0.21, 0.28), 2048: (0.34, 0.43)},
            "full": {576: (0.15, 0.24), 960: (0.19, 0.25)},
            "full_bf16": {576: (0.15, 0.27), 960: (0.17, 0.28), 2048: (0.17, 0.33)}},
    "avx512": {"lora": {576: (0.55, 0.64), 960: (0.64, 0.69), 2048: (0.72, 0.70)},
               "full": {576: (0.50, 0.60), 960: (0.61, 0.61)},
               "full_bf16": {576: (0.50, 0.63), 960: (0.61, 0.71), 2048: (0.61, 0.69)}},
    "avx512_wide": {"lora": {576: (0.40, 0.55), 960: (0.53, 0.63), 2048: (0.62, 0.63)},
                    "full": {576: (0.42, 0.54), 960: (0.53, 0.54)},
                    "full_bf16": {576: (0.37, 0.61), 960: (0.54, 0.65), 2048: (0.71, 0.68)}},
    "fp32": {"lora": {576: (0.72, 0.76), 960: (0.76, 0.78)}, "full": {576: (0.80, 0.79)},
             "full_bf16": {576: (0.02, 0.02)}},
}
CPU_UNITS = {"amx": "AMX tiles", "avx512_wide": "full-width AVX-512",
             "avx512": "AVX-512 at half width or narrower",
             "fp32": "fp32 vector units (no fast bf16)"}  # what the report calls each unit
GPU_EFFICIENCY = 0.35  # a usual figure for fine-tuning loops on tensor cores
QLORA_CPU_SLOWDOWN = 3.0  # bitsandbytes dequantizes every 4-bit weight in forward and backward
# The time of gradient checkpointing's recomputed forward, as a share of its FLOPs at the step's
# share of the peak. A LoRA step is mostly forward-like GEMMs, and the recompute costs what its FLOPs
# say (measured 1.31-1.41x the step's time at 135m and 1.7b, predicted 1.34-1.45). A full step's
# share is held down by the weight-gradient GEMMs and the optimizer's passes, which the recompute
# has none of: it measured 1.10-1.27x (mean 1.15) at 135m, 360m and 1.7b, predicted 1.25-1.31 at
# full weight and 1.12-1.16 at half. bench/RESULTS.md, "Gradient checkpointing, measured" and "The
# Zen 5 shares".
RECOMPUTE_TIME_WEIGHT = {"full": 0.5, "lora": 1.0, "qlora": 1.0}


def flops_per_token(arch: Arch, s: Setup) -> float:
    """Training FLOPs per token. Full: 6N (forward 2N, backward 4N); a frozen base needs no weight
    gradients, so LoRA/QLoRA: 4N + 6 per adapter parameter; gradient checkpointing adds one more
    forward of the decoder's layers (2N without the head: the loss makes the head's gradients in its
    forward, so nothing of it is recomputed). The output head's share of N runs on answer tokens
    only (the loss never applies it to the prompt's). Causal attention adds 6 x layers x q_dim x seq
    (scores and values, forward and backward, half the pairs for the mask); with the data known,
    its examples' sum(L^2) / sum(L) instead of seq."""
    head = arch.vocab_size * arch.hidden_size
    n = arch.linear_params + head * s.answer_fraction  # matmul parameters, the head where it runs
    if s.method == "full":
        base = 6.0 * n
    else:
        base = 4.0 * n + 6.0 * arch.lora_params(s.lora_rank, s.lora_targets)
    attention = 6.0 * arch.num_layers * arch.q_dim * (s.attention_len or s.max_seq_len)
    return base + recompute_flops(arch, s) + attention


def recompute_flops(arch: Arch, s: Setup) -> float:
    """Gradient checkpointing's FLOPs per token: the layers run their forward again; the head never
    (see flops_per_token)."""
    return 2.0 * arch.linear_params if s.gradient_checkpointing else 0.0


@dataclass
class Timing:
    flops_per_token: float
    tokens_per_s: float
    step_s: float
    total_s: float | None
    rate_tflops: float
    rate_source: str
    efficiency: float  # the share of the peak the step reaches (model FLOPs / peak)


# bf16 matmul GFLOP/s per core that tells full-width AVX-512 units (Zen 5 servers and desktops:
# 425-490 measured) from 512-bit instructions run on 256-bit halves (Zen 4, Zen 5 laptops: 200-220).
# The flags are the same on both; the measured rate is what differs.
WIDE_AVX512_GFLOPS_PER_CORE = 300


def cpu_matmul_unit(bf16_tflops: float | None = None, threads: int | None = None) -> str:
    """This CPU's bf16 matmul unit as CPU_EFFICIENCY names it: amx by its flag; fp32 for a CPU
    without a fast bf16 unit (it trains in fp32); else avx512_wide when the measured bf16 rate
    (TFLOP/s on `threads` cores) is at least WIDE_AVX512_GFLOPS_PER_CORE a core, else avx512 (also
    what an AVX512-BF16 CPU without a measured rate takes)."""
    from tunelab.hardware import cpu_flags, cpu_has_fast_bf16, physical_cores

    if "amx_bf16" in cpu_flags():
        return "amx"
    if not cpu_has_fast_bf16():
        return "fp32"
    if bf16_tflops and bf16_tflops * 1e3 / (threads or physical_cores()) >= WIDE_AVX512_GFLOPS_PER_CORE:
        return "avx512_wide"
    return "avx512"


def cpu_efficiency(hidden_size: int, compiled: bool, kind: str = "lora", unit: str | None = None) -> float:
    """The share of the matmul peak a training step reaches on a CPU; kind: lora, full or full_bf16;
    unit: a key of CPU_EFFICIENCY, this CPU's when None. np.interp holds the end values beyond the
    measured widths."""
    import math

    import numpy as np

    table = CPU_EFFICIENCY[unit or cpu_matmul_unit()][kind]
    widths = sorted(table)
    shares = [table[w][compiled] for w in widths]
    return float(np.interp(math.log(hidden_size), [math.log(w) for w in widths], shares))


def estimate(arch: Arch, s: Setup, peak_tflops: float, kind: str, steps: int | None,
             rate_source: str, compiled: bool = False, cpu_unit: str | None = None) -> Timing:
    """cpu_unit: the CPU's bf16 matmul unit (CPU_EFFICIENCY), this machine's when None."""
    method = "full_bf16" if s.bf16_weights else "full" if s.method == "full" else "lora"
    eff = GPU_EFFICIENCY if kind == "gpu" else cpu_efficiency(arch.hidden_size, compiled, method, cpu_unit)
    rate = peak_tflops * 1e12 * eff
    if s.method == "qlora" and kind == "cpu":
        rate /= QLORA_CPU_SLOWDOWN
    fpt = flops_per_token(arch, s)
    tps = rate / (fpt - (1.0 - RECOMPUTE_TIME_WEIGHT[s.method]) * recompute_flops(arch, s))
    step_tokens = (s.mean_batch_tokens or s.tokens) * s.grad_accum_steps
    step_s = step_tokens / tps
    return Timing(fpt, tps, step_s, step_s * steps if steps else None, peak_tflops, rate_source, eff)


def calibration_path() -> Path:
    from tunelab.models.load import cache_dir

    return cache_dir() / "matmul_rate.json"


BUSY_SHARE = 0.7  # a CPU measurement that got less of its cores than this is not cached


def machine_rates(threads: int | None = None, seconds: float = 1.0, use_cache: bool = True) -> dict:
    """bf16 and fp32 matmul TFLOP/s of this CPU (or GPU), measured once and cached. Measured while
    other work held the CPU, the rates are returned with `busy_share` (the share of its cores the
    measurement got) and not cached."""
    import platform

    import torch

    from tunelab.hardware import cpu_has_fast_bf16, physical_cores

    threads = threads or physical_cores()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name(0) if dev == "cuda" else _cpu_model() or platform.processor()
    key = f"{dev}|{name}|torch {torch.__version__}|{threads} threads|2048x2048"
    path = calibration_path()
    cache = {}
    if use_cache and path.is_file():
        try:
            cache = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            cache = {}
        if key in cache:
            return cache[key]
    # A CPU without AVX512-BF16 or AMX emulates bf16 matmuls (AVX2 Zen 2, 2 cores: 1.4 GFLOP/s at
    # n = 512, 0.16 at 2048): one 2048 x 2048 product took 105 s there, so it is timed at 512.
    bf16_n = 2048 if dev == "cuda" or cpu_has_fast_bf16() else 512
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        rates = {"bf16": matmul_tflops(torch.bfloat16, dev, seconds, bf16_n),
                 "fp32": matmul_tflops(torch.float32, dev, seconds),
                 "device": dev, "name": name, "threads": threads, "measured": time.strftime("%Y-%m-%d %H:%M")}
    finally:
        torch.set_num_threads(old)
    # The share of its cores the measurement got: other work on the CPU (a training run) lowers
    # the rate, and a rate measured so must not be kept as this machine's.
    share = (time.process_time() - cpu) / ((time.perf_counter() - wall) * threads)
    if dev == "cpu" and share < BUSY_SHARE:
        return {**rates, "busy_share": round(share, 2)}
    cache[key] = rates
    try:
        from tunelab.runs import atomic_write_json

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, cache)
    except OSError:
        pass  # a read-only home: measure again next time
    return rates


def matmul_tflops(dtype, dev: str = "cpu", seconds: float = 3.0, n: int = 2048) -> float:
    """Measured rate of an n x n matmul in `dtype` on `dev`, in TFLOP/s (what `tunelab plan` times steps with)."""
    import torch

    a = torch.randn(n, n, dtype=dtype, device=dev)
    b = torch.randn(n, n, dtype=dtype, device=dev)
    for _ in range(2):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    if dev == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * count / (time.perf_counter() - start) / 1e12


def matmul_peak_tflops(dtype, dev: str = "cpu", sizes=(1024, 1536, 2048, 2560, 3072), repeats: int = 2) -> float:
    """The best rate of short n x n matmuls over a few sizes and repeats, in TFLOP/s: the peak that
    MFU is taken against. One 3 s run at n = 2048 measured anywhere from 1580 to 2085 GFLOP/s in the
    runs of bench/RESULTS.md (a shared 2-core machine); the best of several is steadier, and a peak
    set too low would overstate MFU."""
    return max(matmul_tflops(dtype, dev, 0.5, n) for n in sizes for _ in range(repeats))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine
