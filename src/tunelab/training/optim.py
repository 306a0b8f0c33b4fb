"""AdamW (fp32, 8-bit or bf16 moments) and the learning-rate schedule (linear warmup, then cosine,
linear or constant)."""

import functools
import math
import platform

import torch

from tunelab.config.schema import TrainConfig


def build_optimizer(model, cfg: TrainConfig, compiled: bool = False, seed: int = 0) -> torch.optim.Optimizer:
    """compiled: fuse AdamWBf16's update into one kernel per tensor; seed: its rounding noise's
    (weight_dtype bf16)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # norms and biases are not decayed (standard practice since BERT); under DeepSpeed ZeRO-3 a
        # weight is an empty 1-d shell here and keeps its shape in ds_shape
        (no_decay if len(getattr(p, "ds_shape", p.shape)) < 2 else decay).append(p)
    # an empty group (LoRA has no norms or biases to train) is left out: DeepSpeed drops it from
    # the optimizer it is given, and the schedule would then be one group ahead of it
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if cfg.optimizer == "adamw_8bit":
        # Dettmers et al. 2021, "8-bit Optimizers via Block-wise Quantization": both moments stored
        # as uint8 with one fp32 scale per block of 256, dequantized per tensor inside the step.
        # bitsandbytes keeps fp32 moments for tensors under 4096 elements (norms, biases, small
        # adapters), where quantizing saves little and costs accuracy. It runs on CPUs too.
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                   weight_decay=cfg.weight_decay)
    if cfg.weight_dtype == "bf16":
        return AdamWBf16(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), compiled=compiled,
                         seed=seed)
    # fused: one kernel per tensor that updates the weight and both moments in place, on CPUs as on
    # GPUs. On this CPU it steps SmolLM2-135M in 0.11 s against foreach's 0.63 s, and makes none of
    # foreach's temporaries (~470 MB there); bench/RESULTS.md.
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), fused=True)


def step_in_backward(model, optimizer: torch.optim.Optimizer) -> list:
    """Step each trained weight the moment backward has accumulated its gradient, then free that
    gradient (train.optimizer_in_backward): a layer's gradients live until its own step, not until
    the end of backward. The one optimizer keeps its moments, schedule and checkpoint as usual.

    optimizer.step() steps every weight that has a gradient, and when a weight's hook runs it is
    the only one: autograd runs each weight's hooks right after accumulating its gradient, and
    every hook before it freed its own. A weight used twice (tied embeddings and head) accumulates
    both uses before its hook runs. Returns the hooks' handles."""

    def step_and_free(weight: torch.Tensor) -> None:
        optimizer.step()
        weight.grad = None

    _make_state_now(optimizer)
    return [p.register_post_accumulate_grad_hook(step_and_free) for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def _make_state_now(optimizer: torch.optim.Optimizer) -> None:
    """Make the optimizer's state (AdamW's moments) before training: one step per weight on a zero
    gradient at learning rate 0, which leaves the weight as it is, then the step count back at 0.
    Made inside the first backward instead, between the activations' frees, the moments
    fragmented the heap: SmolLM2-135M then peaked 220 MB higher from its second step on
    (bench/RESULTS.md)."""
    params = [p for group in optimizer.param_groups for p in group["params"] if not optimizer.state.get(p)]
    lrs = [group["lr"] for group in optimizer.param_groups]
    try:
        for group in optimizer.param_groups:
            group["lr"] = 0.0
        for p in params:
            # a tensor of its own: views of one zero buffer made AdamWBf16's compiled update
            # recompile for every shape, up to dynamo's limit, and then run eager
            p.grad = torch.zeros_like(p)
            optimizer.step()
            p.grad = None
            optimizer.state[p]["step"] = optimizer.state[p]["step"] * 0  # a tensor (torch, ours) or an int
    finally:
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr


class AdamWBf16(torch.optim.Optimizer):
    """AdamW for bf16 weights, with bf16 moments: 6 bytes of weight and state per parameter where
    fp32 master weights and moments take 12, and the gradients are bf16 too (2 bytes instead of 4).

    The update is computed in fp32, and the new weight and moments are rounded to bf16
    stochastically: up or down with probabilities by distance, so the rounding is unbiased. Round to
    nearest would drop every update smaller than half a bf16 step (1/256 of the weight), which
    at fine-tuning learning rates is most of them, and would freeze the second moment (beta2 =
    0.999 moves it by 0.1% a step). Zamirai et al. 2020, "Revisiting BFloat16 Training".
    """

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 compiled: bool = False, seed: int = 0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.compiled = compiled
        self.seed = seed
        self.grad_scale = torch.tensor(1.0)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """The gradients' global L2 norm. If it exceeds max_norm, the next step scales the gradients
        by max_norm / norm inside its update: the same result as torch.nn.utils.clip_grad_norm_,
        without a separate pass over them (0.09 s a step on bf16 gradients for 135M weights)."""
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm(grads)]))
        self.grad_scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        return norm

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        update = _compiled_adamw_bf16_update() if self.compiled else _adamw_bf16_update_in_slices
        index = 0
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                if p.dtype != torch.bfloat16:
                    raise TypeError(f"AdamWBf16 updates bf16 weights; got a {p.dtype} tensor {tuple(p.shape)}")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"].item()
                # scalars as 0-d tensors: a compiled update would recompile for every new Python float
                scalars = [torch.tensor(x, dtype=torch.float32) for x in (
                    group["lr"], group["weight_decay"], beta1, beta2, 1 - beta1 ** t, math.sqrt(1 - beta2 ** t),
                    group["eps"])]
                # The rounding noise is a function of (seed, step, tensor): a resumed run repeats it, and
                # under DDP every process rounds its copy of the weights the same way.
                seed = torch.tensor(_mix(self.seed, int(t), index) & 0x7FFFFFFF, dtype=torch.int32)
                # flat: every tensor is then 1-D, so the compiled update is one graph for all of them
                # (by shape it compiled again for 1-D norms, 2-D weights, ...); the noise follows the
                # flat element index either way, so the numbers are the same
                update(p.view(-1), p.grad.reshape(-1), state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1),
                       self.grad_scale, *scalars, seed)
        self.grad_scale = torch.tensor(1.0)
        return loss


def _adamw_bf16_update(p, g, m, v, grad_scale, lr, decay, beta1, beta2, bias1, sqrt_bias2, eps, seed) -> None:
    """One AdamW update of bf16 tensors in place, computed in fp32 and rounded stochastically."""
    p32, g32 = p.float(), g.float() * grad_scale
    m32 = m.float() * beta1 + g32 * (1 - beta1)
    v32 = v.float() * beta2 + g32 * g32 * (1 - beta2)
    p32 = p32 * (1 - lr * decay) - (lr / bias1) * m32 / (v32.sqrt() / sqrt_bias2 + eps)
    noise = _hash32(torch.arange(p.numel(), dtype=torch.int32, device=p.device).view(p.shape) + seed)
    p.copy_(_round_stochastic(p32, noise & 0xFFFF))
    m.copy_(_round_stochastic(m32, (noise >> 8) & 0xFFFF))
    v.copy_(_round_stochastic(v32, (noise >> 16) & 0xFFFF))


def _round_stochastic(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16, rounded up with probability (dropped low 16 bits) / 2^16 given uniform 16-bit
    noise: a bf16 is an fp32's high 16 bits, so adding the noise to the low ones carries into the
    kept bits exactly that often (for negative numbers too: the magnitude is what carries)."""
    return ((x.view(torch.int32) + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """Wellons' lowbias32 integer hash: counter -> 32 well-mixed bits, cheap enough to run per element
    (torch's own random numbers made the update 6x slower). int32 products wrap; >> is arithmetic,
    so each shift is masked to be logical."""
    x = (x ^ ((x >> 16) & 0xFFFF)) * 0x7FEB352D
    x = (x ^ ((x >> 15) & 0x1FFFF)) * -2073254261  # 0x846CA68B as an int32
    return x ^ ((x >> 16) & 0xFFFF)


def _mix(*parts: int) -> int:
    """_hash32 on Python ints, folded over several numbers: 32 bits."""
    h = 0
    for x in parts:
        h = (h ^ x) & 0xFFFFFFFF
        h = ((h ^ (h >> 16)) * 0x7FEB352D) & 0xFFFFFFFF
        h = ((h ^ (h >> 15)) * 0x846CA68B) & 0xFFFFFFFF
        h ^= h >> 16
    return h


def _adamw_bf16_update_in_slices(p, g, m, v, *scalars) -> None:
    """Eager: the same update 2^20 elements at a time, so its fp32 temporaries stay a few MB."""
    *rest, seed = scalars
    flat = [t.view(-1) for t in (p, g, m, v)]
    for i, start in enumerate(range(0, p.numel(), SLICE)):
        _adamw_bf16_update(*(t[start:start + SLICE] for t in flat), *rest, seed + i * SLICE)


SLICE = 2 ** 20


@functools.cache
def _compiled_adamw_bf16_update():
    # One fused loop per tensor: no fp32 temporaries at all; dynamic: one compile for every shape.
    # On x86, 256-bit vectors: at inductor's default 512 the fp32<->int32 reinterpretations of the
    # rounding go through a scalar loop, and the update took 0.25 s for 135M weights, against 0.14 s.
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return torch.compile(_adamw_bf16_update, dynamic=True, options={"cpp.simdlen": 256} if x86 else None)


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return min(cfg.warmup_steps, total_steps)
    return max(0, round(0.05 * total_steps))


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, cfg: TrainConfig, total_steps: int):
    warm = warmup_steps(cfg, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warm, cfg.lr_scheduler))
