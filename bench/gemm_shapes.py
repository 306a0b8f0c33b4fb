"""What a new row count costs oneDNN: a LoRA step's GEMMs at one fixed token count, and at a new one every step.

Packed batches change their token count T every step, and oneDNN builds (JIT-compiles) a matmul
kernel for every new shape: ~2-8 ms each for the decoder's [T x 576] products, more for the head's.
This times the GEMMs of a LoRA step of SmolLM2-135M's shapes (30 layers; q/o, k/v, gate/up and
down with their rank-16 adapters, forward and backward, bf16) over 10 steps, once with T fixed and
once with T new each step; the difference is what the kernel builds cost a step. Each setting runs
in its own process, so neither finds the other's kernels cached.

usage: python bench/gemm_shapes.py [--steps 10] [--tokens 1500]
"""

import argparse
import json
import subprocess
import sys
import time

HIDDEN, INTERMEDIATE, KV, RANK, LAYERS = 576, 1536, 192, 16, 30  # SmolLM2-135M, LoRA rank 16


def layer_weights() -> list:
    """(weight, A, B) of one layer's linear layers, as (out, in) shapes: q/o, k/v, gate/up, down."""
    import torch

    bf16 = dict(dtype=torch.bfloat16)
    shapes = [(HIDDEN, HIDDEN), (KV, HIDDEN), (INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)]
    return [(torch.randn(o, i, **bf16), torch.randn(RANK, i, **bf16), torch.randn(o, RANK, **bf16)) for o, i in shapes]


def lora_step_gemms(weights: list, tokens: int) -> None:
    """One step's GEMMs: each linear layer's forward and input gradient, its adapter's four products
    (the same weights in every layer: the shapes are what counts)."""
    import torch
    import torch.nn.functional as F

    inputs = {n: torch.randn(tokens, n, dtype=torch.bfloat16) for n in (HIDDEN, INTERMEDIATE)}
    for _ in range(LAYERS):
        for w, a, b in weights:
            x = inputs[w.shape[1]]
            grad = F.linear(x, w)  # stands in for the output's gradient: same shape
            u = F.linear(x, a)
            F.linear(u, b)
            grad @ w
            v = grad @ b
            grad.t() @ u
            v.t() @ x
            v @ a


def worker(steps: int, tokens: int, vary: bool) -> dict:
    import torch

    torch.manual_seed(0)
    weights = layer_weights()
    counts = [tokens + 37 * k if vary else tokens for k in range(steps)]
    lora_step_gemms(weights, tokens - 100 if vary else tokens)  # warm up: fixed, its shapes are then built
    start = time.perf_counter()
    for t in counts:
        lora_step_gemms(weights, t)
    return {"ms_per_step": (time.perf_counter() - start) / steps * 1e3}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--tokens", type=int, default=1500)
    p.add_argument("--worker", choices=["fixed", "new"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return print(json.dumps(worker(a.steps, a.tokens, a.worker == "new")))
    print(f"the GEMMs of a LoRA step, {LAYERS} layers, ~{a.tokens} tokens, {a.steps} steps\n")
    print(f"{'token count':28} {'ms per step':>12}")
    times = {}
    for kind, label in [("fixed", "the same every step"), ("new", "a new one every step")]:
        out = subprocess.run([sys.executable, __file__, "--steps", str(a.steps), "--tokens", str(a.tokens),
                              "--worker", kind], capture_output=True, text=True, check=True).stdout
        times[kind] = json.loads(out.splitlines()[-1])["ms_per_step"]
        print(f"{label:28} {times[kind]:12.0f}")
    print(f"\nkernel builds: {times['new'] - times['fixed']:.0f} ms a step "
          f"({(times['new'] - times['fixed']) / times['new']:.0%} of the GEMMs' time)")


if __name__ == "__main__":
    main()
