"""Packed attention, forward + backward, for one SmolLM2 layer: PyTorch's CPU flash kernel example by
example (what eager runs use) against tunelab's custom op (what compiled runs use) in its two forms:
the C++ kernels of csrc/packed_attention.cpp where they build, and the PyTorch path (the same flash
forward, our compiled per-example backward) where they do not.

Shapes: 9 query heads on 3 K/V heads, head size 64, bf16; 8 examples packed into one row, with the
lengths of 8 rows drawn from the alpaca demo (the train_speed bench's data and batch size; ~4
characters per token).

usage: python bench/attention_backward.py [--repeat 10] [--seed 0]
(TUNELAB_CPU_KERNELS=0 leaves the C++ row out)
"""

import argparse
import contextlib
import time

import torch
import torch.nn.functional as F

import tunelab.training.attention  # noqa: F401  registers torch.ops.tunelab.packed_attention
from tunelab.training import kernels


def flash_per_example(q, k, v, cuts):
    return torch.cat([F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True,
                                                     enable_gqa=True) for a, b in zip(cuts, cuts[1:])], dim=2)


def tunelab_op(q, k, v, cuts):
    return torch.ops.tunelab.packed_attention(q, k, v, torch.tensor(cuts, dtype=torch.int32), 64 ** -0.5)[0]


@contextlib.contextmanager
def without_kernels():
    """The op as it runs where the C++ kernels cannot be built."""
    real = kernels.attention_kernels
    kernels.attention_kernels = lambda dtype, head_dim: None
    try:
        yield
    finally:
        kernels.attention_kernels = real


def timed(fn, args, grad, repeat: int) -> tuple[float, float]:
    for _ in range(2):  # warm-up (and the one-time compile of our backward)
        fn(*args).backward(grad)
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(repeat):
            fn(*args)
    forward = (time.perf_counter() - t0) / repeat
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn(*args).backward(grad)
    return forward, (time.perf_counter() - t0) / repeat


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    g = torch.Generator().manual_seed(a.seed)
    # 8 alpaca demo rows drawn at random, in tokens (a typical micro batch of the train_speed bench)
    lengths = [68, 40, 401, 52, 56, 321, 141, 393]
    cuts = [0]
    for n in lengths:
        cuts.append(cuts[-1] + n)
    t = cuts[-1]
    q = torch.randn(1, 9, t, 64, generator=g, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, 3, t, 64, generator=g, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    grad = torch.randn(1, 9, t, 64, generator=g, dtype=torch.bfloat16)
    print(f"8 examples, {t} tokens, lengths {lengths}; ms per layer, {a.repeat} repeats\n")
    print(f"{'attention':52} {'forward':>8} {'fwd+bwd':>8} {'backward':>9}")
    rows = [("CPU flash per example (eager runs)", flash_per_example, contextlib.nullcontext),
            ("tunelab op, PyTorch path: flash fwd + compiled bwd", tunelab_op, without_kernels)]
    if kernels.attention_kernels(torch.bfloat16, 64) is not None:
        rows.append(("tunelab op, C++ kernels (compiled runs here)", tunelab_op, contextlib.nullcontext))
    else:
        print("(tunelab's C++ kernels are not available here: their row is missing)")
    for name, fn, context in rows:
        with context():
            f, fb = timed(fn, (q, k, v, cuts), grad, a.repeat)
        print(f"{name:52} {f * 1e3:8.2f} {fb * 1e3:8.2f} {(fb - f) * 1e3:9.2f}")


if __name__ == "__main__":
    main()
