"""Where a training step's time goes, and the MFU each part leaves room for.

Runs one tunelab row of bench/train_speed.py (same model, data, LoRA, batch, learning rate) under
torch.profiler for a few steps after the compile, sorts every operator into a part of the step, and
prints each part's seconds per step, its share, and the MFU the step would reach if only that part
and the ones above it took time. The first such figure is the ceiling the matmuls themselves set:
every GEMM at the rate oneDNN reaches on its shapes here, and nothing else.

Parts:
- linear-layer GEMMs: aten::mm / addmm of the decoder's linear layers (forward, input and weight
  gradients), with their GFLOP/s;
- LoRA adapter GEMMs (--method lora): the ones with a rank-sized dimension;
- output-head GEMMs: the ones with a vocabulary-sized dimension (the fused loss's chunks);
- attention forward and backward: the packed-attention ops with the matmuls and kernels inside them
  (or PyTorch's flash attention in eager runs);
- optimizer step: AdamW's update (gradient clipping and zeroing are in the last row);
- everything else: the fused elementwise kernels (norms, RoPE, SiLU, residuals, the loss's
  softmax), the embedding, gradient clipping, Python.

usage: python bench/step_profile.py [--method lora|full] [--variant compile|bf16-weights|eager|...]
                                    [--steps 3] [--shape 135m|360m|1.7b] [--shared ../shared]
"""

import argparse
import time
from pathlib import Path

import torch

from tunelab.data.encode import IGNORE

from train_speed import (LORA_RANK, SHAPES, bench_inputs, compute_peak, flops_per_token, model_counts, tunelab_config,
                         variant_arg, variant_label)

HERE = Path(__file__).resolve().parent
WAIT = 2  # training steps before the profiled ones: the first holds the compile, the second warms up
ATTENTION = ("tunelab::packed_attention", "aten::scaled_dot_product_attention", "aten::_scaled_dot_product")
GEMMS = ("aten::mm", "aten::addmm", "aten::bmm")


def profile_steps(model_dir: Path, data: Path, method: str, variant: str, steps: int):
    """Train WAIT + steps + 1 steps and profile `steps` of them. Returns the profiler's events, the
    wall seconds, and the tokens and answer tokens (the head's rows) of the profiled steps.

    The profiler's own steps are marked at each training step's forward, so its step 0 is the setup
    (model loading) and its step k the training step k - 1: waiting WAIT steps and warming up one
    leaves training steps WAIT .. WAIT + steps - 1 active."""
    import tunelab
    import tunelab.training.loop as loop

    starts, tokens, answers, events = [], [], [], []
    prof = torch.profiler.profile(record_shapes=True,
                                  schedule=torch.profiler.schedule(wait=WAIT, warmup=1, active=steps),
                                  on_trace_ready=lambda p: events.extend(p.events()))
    real_loss = loop.token_loss_sum

    def marked_loss(model, batch, compiled=False):  # one call per step here (grad_accum_steps 1)
        starts.append(time.perf_counter())  # before prof.step(): the last one processes the trace
        prof.step()
        tokens.append(batch["input_ids"].numel())
        answers.append(int((batch["labels"][:, 1:] != IGNORE).sum()))
        return real_loss(model, batch, compiled)

    loop.token_loss_sum = marked_loss
    try:
        with prof:
            tunelab.train(tunelab_config(str(model_dir), str(data), WAIT + steps + 1, method, variant), quiet=True,
                          force=True)  # as train_speed.py: the plan assumes full-length rows
    finally:
        loop.token_loss_sum = real_loss
    timed = slice(WAIT, WAIT + steps)
    return events, starts[WAIT + steps] - starts[WAIT], sum(tokens[timed]), sum(answers[timed])


def gemm_flops(event) -> float:
    """2 M K N (times the batch) from the operands' recorded shapes; an out= tensor comes after them."""
    shapes = event.input_shapes
    a, b = (shapes[1], shapes[2]) if event.name == "aten::addmm" else (shapes[0], shapes[1])
    if len(a) < 2 or len(b) < 2:
        return 0.0
    batch = a[0] if len(a) == 3 else 1
    return 2.0 * batch * a[-2] * a[-1] * b[-1]


def sort_into_parts(events, vocab: int, rank: "int | None") -> dict:
    """Seconds and GEMM FLOPs per part, summed over the profiled steps. A marked operator (attention,
    the optimizer) counts with everything under it; GEMMs elsewhere count their own time."""
    names = ("linear-layer GEMMs",) + (("LoRA adapter GEMMs",) if rank else ()) + (
        "output-head GEMMs", "attention forward", "attention backward", "optimizer step")
    parts = {name: [0.0, 0.0] for name in names}

    def marked(event) -> "str | None":
        if event.name.startswith(ATTENTION):
            return "attention backward" if "backward" in event.name.lower() else "attention forward"
        if event.name.startswith("Optimizer.step"):
            return "optimizer step"
        return None

    def inside_marked(event) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if marked(parent):
                return True
            parent = parent.cpu_parent
        return False

    for e in events:
        part = marked(e)
        if part and not inside_marked(e):
            parts[part][0] += e.cpu_time_total / 1e6
        elif e.name in GEMMS and not inside_marked(e):
            dims = {d for shape in e.input_shapes for d in shape}
            p = parts["output-head GEMMs" if vocab in dims else "LoRA adapter GEMMs" if rank in dims
                      else "linear-layer GEMMs"]
            p[0] += e.self_cpu_time_total / 1e6
            p[1] += gemm_flops(e)
    return parts


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--method", default="lora", choices=["lora", "full"])
    p.add_argument("--variant", default="compile", type=variant_arg, help="a row of train_speed.py")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--shared", default=str(HERE.parent.parent / "shared"))
    p.add_argument("--shape", default="135m", choices=list(SHAPES), help="SmolLM2's size (see train_speed.py)")
    a = p.parse_args()
    model_dir, data = bench_inputs(Path(a.shared), a.shape)

    from transformers import AutoConfig

    conf = AutoConfig.from_pretrained(model_dir)
    compute, peak = compute_peak()
    peak *= 1e9
    events, seconds, tokens, answers = profile_steps(model_dir, data, a.method, a.variant, a.steps)
    parts = sort_into_parts(events, conf.vocab_size, LORA_RANK if a.method == "lora" else None)
    per_step = seconds / a.steps
    rows = [(name, s / a.steps, flops) for name, (s, flops) in parts.items()]
    rows.append(("everything else", per_step - sum(r[1] for r in rows), 0.0))
    model_flops = tokens / a.steps * flops_per_token(a.method, *model_counts(model_dir), conf.num_hidden_layers,
                                                     conf.hidden_size, tokens / a.steps / 8, answers / tokens)
    print(f"\ntunelab {a.method} {variant_label(a.variant)}: {per_step:.2f} s a step, {tokens / a.steps:.0f} tokens "
          f"a step ({tokens / seconds:.0f} tokens/s), MFU {model_flops / per_step / peak:.1%} "
          f"({compute} matmul peak {peak / 1e9:.0f} GFLOP/s; {a.steps} steps profiled)\n")
    head = f"{'part':22} {'s/step':>7} {'share':>6} {'GFLOP/s':>8} {'MFU if only this part and those above took time':>49}"
    print(head)
    print("-" * len(head))
    cumulative = 0.0
    # the GEMM rows come first; the model's FLOPs are all done only once the last of them counts
    last_gemm = max(i for i, (name, _, _) in enumerate(rows) if name.endswith("GEMMs"))
    for i, (name, s, flops) in enumerate(rows):
        cumulative += s
        rate = f"{flops / a.steps / s / 1e9:8.0f}" if flops and s > 0 else ""
        ceiling = f"{model_flops / cumulative / peak:.1%}" if i >= last_gemm else ""
        print(f"{name:22} {s:7.3f} {s / per_step:6.1%} {rate:>8} {ceiling:>49}")
    print("\nThe profiler adds its own overhead (a few %), mostly in the last row; the tokens/s of\n"
          "bench/train_speed.py are the unprofiled figure.")


if __name__ == "__main__":
    main()
