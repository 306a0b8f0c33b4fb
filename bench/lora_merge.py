"""One LoRA linear layer, forward and backward, computed four ways (bf16, 2 threads, compiled).

Measured for issue 3 (stop 22), not kept; see bench/RESULTS.md "The adapter merged into the weight
for the step". The ways:
- update:   tunelab's path, x W^T + s (x A^T) B^T; backward g W + s (g B) A.
- merged:   the adapter merged into the weight once a step, x (W + s B A)^T in one GEMM, rounded to
            bf16 at the nearest value; backward g (W + s B A). Fewer [tokens x width] passes, but
            an update smaller than half a bf16 step of W is rounded away in the forward pass.
- dithered: the same merge with a fixed random offset inside half a step of each weight added
            before rounding, so that small updates are seen on average (the offset alone leaves W
            unchanged); the offsets are kept, one bf16 per weight.
- backward: the forward as `update`, only the input gradient through the merged weight.

usage: python bench/lora_merge.py [--tokens 1500] [--shape 135m|360m|1.7b] [--eager]
"""

import argparse
import time

import torch

BF16 = torch.bfloat16
RANK, SCALE = 16, 2.0
WIDTHS = {"135m": {"q": (576, 576), "k": (576, 192), "gate": (576, 1536), "down": (1536, 576)},
          "360m": {"q": (960, 960), "k": (960, 320), "gate": (960, 2560), "down": (2560, 960)},
          "1.7b": {"q": (2048, 2048), "gate": (2048, 8192), "down": (8192, 2048)}}


def merge(weight, dither, lora_a, lora_b):
    exact = weight.float() + SCALE * (lora_b.float() @ lora_a.float())
    return (exact if dither is None else exact + dither.float()).to(BF16)


class Merged(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, dither, lora_a, lora_b, exact_forward):
        a, b = lora_a.to(BF16), lora_b.to(BF16)
        merged = merge(weight, dither, lora_a, lora_b)
        x_a = x @ a.t()
        ctx.save_for_backward(x, merged, b, x_a)
        return x @ weight.t() + (x_a * SCALE) @ b.t() if exact_forward else x @ merged.t()

    @staticmethod
    def backward(ctx, grad):
        x, merged, b, x_a = ctx.saved_tensors
        grad_a = ((grad @ b).t() @ x) * SCALE
        grad_b = (grad.t() @ x_a) * SCALE
        return grad @ merged, None, None, grad_a.float(), grad_b.float(), None


def update(x, weight, dither, lora_a, lora_b):
    with torch.autocast("cpu", dtype=BF16):
        return torch.nn.functional.linear(x, weight) + (x @ lora_a.t() * SCALE) @ lora_b.t()


WAYS = {"update": update,
        "merged": lambda x, w, d, a, b: Merged.apply(x, w, None, a, b, False),
        "dithered": lambda x, w, d, a, b: Merged.apply(x, w, d, a, b, False),
        "backward": lambda x, w, d, a, b: Merged.apply(x, w, None, a, b, True)}


def half_step_dither(weight: torch.Tensor) -> torch.Tensor:
    """Uniform offsets strictly inside half the bf16 spacing below and above each weight."""
    w = weight.float().abs()
    mantissa, exponent = torch.frexp(w)
    spacing = torch.ldexp(torch.full_like(w, torch.finfo(BF16).eps), exponent - 1 - (mantissa == 0.5).int())
    return torch.where(w > 0, (torch.rand(w.shape) - 0.5) * 0.98 * spacing, 0.0).to(BF16)


def ms_per_call(fn, inputs, runs: int = 60) -> float:
    times = []
    for _ in range(runs):
        x = inputs[0].detach().requires_grad_()
        started = time.perf_counter()
        y = fn(x, *inputs[1:])
        y.backward(torch.ones_like(y))
        times.append(time.perf_counter() - started)
    times.sort()
    return sum(times[: runs // 2]) / (runs // 2) * 1e3  # the faster half: the machine is shared


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=1500)
    p.add_argument("--shape", default="135m", choices=list(WIDTHS))
    p.add_argument("--eager", action="store_true")
    a = p.parse_args()
    torch.manual_seed(0)
    print(f"ms per forward+backward, {a.tokens} tokens, {'eager' if a.eager else 'compiled'}; "
          "small update: the share of a 3e-5 update that the forward pass sees")
    print(f"{'layer':>14} " + " ".join(f"{w:>9}" for w in WAYS))
    for name, (fan_in, fan_out) in WIDTHS[a.shape].items():
        x = torch.randn(a.tokens, fan_in, dtype=BF16)
        weight = (torch.randn(fan_out, fan_in) * 0.02).to(BF16)
        dither = half_step_dither(weight)
        lora_a = (torch.randn(RANK, fan_in) * 0.02).requires_grad_()
        lora_b = (torch.randn(fan_out, RANK) * 0.02).requires_grad_()
        row = [ms_per_call(fn if a.eager else torch.compile(fn), (x, weight, dither, lora_a, lora_b))
               for fn in WAYS.values()]
        print(f"{name + f' {fan_in}->{fan_out}':>14} " + " ".join(f"{t:9.2f}" for t in row))
    weight = (torch.randn(576, 576) * 0.02).to(BF16)
    lora_a, lora_b = torch.ones(RANK, 576), torch.full((576, RANK), 3e-5 / (RANK * SCALE))  # B A = 3e-5 / SCALE
    for label, d in [("nearest", None), ("dithered", half_step_dither(weight))]:
        seen = (merge(weight, d, lora_a, lora_b).float() - weight.float()).mean()
        print(f"small update seen, {label}: {seen.item() / 3e-5:.0%}")


if __name__ == "__main__":
    main()
