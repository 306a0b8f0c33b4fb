"""Dynamic loss scaling for fp16 compute (model.dtype: fp16, and auto on GPUs without bf16).

fp16 keeps 5 exponent bits: values under ~6e-8 flush to zero, and the gradients of activations often
sit there, so the loss is multiplied by a large scale before backward and the gradients divided by
it before the step (Micikevicius et al. 2018, "Mixed Precision Training"). The scale starts at 2^16,
halves whenever a gradient overflowed, and that step is skipped (no weight or moment changes); it
doubles again after 2000 clean steps. This is torch.amp.GradScaler, the scaler that HF's Trainer
and accelerate use. bf16 has fp32's exponent range and needs none of it."""

import torch

from tunelab.config.schema import TrainConfig
from tunelab.errors import RunError
from tunelab.training import distributed

INIT_SCALE = 2.0 ** 16  # GradScaler's default; tests raise it to force overflows


def loss_scaler(accelerator, compute_dtype: torch.dtype, train: TrainConfig) -> "torch.amp.GradScaler | None":
    """A GradScaler where the run computes in fp16, else None. Refuses the setups it cannot scale."""
    if compute_dtype != torch.float16:
        return None
    fix = "set model.dtype to bf16 (where the hardware has it) or fp32"
    if distributed.strategy(accelerator) == "deepspeed":
        # its ZeRO optimizer holds the gradients, split between processes, before tunelab could unscale
        # them or skip a step; DeepSpeed's own fp16 mode is refused too (distributed.check_deepspeed)
        raise RunError(f"fp16 compute under DeepSpeed: tunelab's loss scaling cannot reach the gradients DeepSpeed "
                       f"holds; {fix}, or launch with examples/accelerate/ddp.yaml or fsdp.yaml")
    if train.optimizer_in_backward:
        raise RunError("fp16 compute with train.optimizer_in_backward=true: each weight would be stepped before the "
                       f"step's gradients are known to be finite; turn optimizer_in_backward off, or {fix}")
    if train.weight_dtype == "bf16":
        raise RunError(f"fp16 compute with train.weight_dtype=bf16: bf16 weights are updated for bf16 compute; {fix}, "
                       "or set train.weight_dtype=fp32")
    if distributed.strategy(accelerator) == "fsdp":
        # each process checks its own shards for overflow; this one agrees on the verdict over all of them
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(accelerator.device.type, init_scale=INIT_SCALE)
    return torch.amp.GradScaler(accelerator.device.type, init_scale=INIT_SCALE)


def scaled(scaler, loss: torch.Tensor) -> torch.Tensor:
    return scaler.scale(loss) if scaler is not None else loss


def unscale(scaler, optimizer) -> None:
    """Divide the gradients by the scale in place (before clipping reads their norm)."""
    if scaler is not None:
        scaler.unscale_(optimizer)


def step(scaler, optimizer) -> bool:
    """optimizer.step(), unless an fp16 gradient overflowed; then the scale is lowered. Returns
    whether the weights were stepped."""
    if scaler is None:
        optimizer.step()
        return True
    before = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return scaler.get_scale() >= before  # the scale falls exactly when the step found an inf or NaN
