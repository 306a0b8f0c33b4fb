"""LoRA adapters on a frozen base, through peft."""

import types

import torch

from tunelab.config.schema import LoraConfig
from tunelab.errors import ConfigError
from tunelab.training.optim import _hash32, _mix


def apply_lora(model, cfg: LoraConfig):
    """Wrap `model` with LoRA adapters (DoRA: plus a magnitude vector per layer); only they train."""
    import peft

    targets = cfg.target_modules
    lora = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                           target_modules=targets, task_type="CAUSAL_LM", bias="none",
                           use_dora=cfg.use_dora)
    try:
        model = peft.get_peft_model(model, lora)
    except ValueError as e:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                        if type(m).__name__ == "Linear"})
        raise ConfigError(f"lora.target_modules={targets!r}: {str(e).splitlines()[0][:160]}; this model's "
                          f"linear layers are: {', '.join(names)} (or use all-linear)") from None
    keep_4bit_base_trainable(model)
    for salt, module in enumerate(model.modules()):
        if type(module) is peft.tuners.lora.Linear:  # not the 4/8-bit (QLoRA) layers: their own forward
            module.forward = types.MethodType(lean_lora_forward, module)
            # which layer a dropout mask is for: a tensor, so that the layers keep sharing one compiled
            # graph (a Python int would specialize it per layer); not saved with the adapter
            salt_tensor = torch.tensor(_mix(salt) & 0x7FFFFFFF, dtype=torch.int32)
            module.register_buffer("dropout_salt", salt_tensor, persistent=False)
    return model


def keep_4bit_base_trainable(model) -> None:
    """bitsandbytes repacks a 4-bit weight in place for its AVX512-BF16 kernel at the first forward
    outside training (validation, generation) and from then on takes that kernel, which has no
    backward, in training too: no gradient would pass through the base to the layers below (and
    under ZeRO-3, which gathers the original layout again, the weights are misread). Turned off for
    a model that trains; inference keeps it."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


# The micro batch a dropout mask is for: set by the training loop before each forward (set_dropout_batch),
# so a checkpointed layer's recomputed forward draws the same mask, and a resumed run the same masks.
DROPOUT_BATCH = torch.zeros((), dtype=torch.int32)


def set_dropout_batch(seed: int, micro_batch: int, process: int = 0) -> None:
    DROPOUT_BATCH.fill_(_mix(seed, micro_batch, process) & 0x7FFFFFFF)


def hashed_dropout(x: torch.Tensor, p: float, salt: torch.Tensor) -> torch.Tensor:
    """Dropout whose mask is a hash of (micro batch, layer, element index) instead of torch's random
    numbers. Compiled, torch's dropout drew its numbers one element at a time: 8.5 ms for a [1600 x 576]
    input forward and backward, and with 7 adapted layers per decoder layer, LoRA with dropout 0.05
    trained at 489 tokens/s against 1313 without (bench/RESULTS.md). The hash is a few vectorized
    integer operations, fused into the same kernel; its 16 low bits are uniform, so an element is
    kept with probability 1 - p to 1/65536, and kept ones are scaled by 1 / (1 - p) as nn.Dropout does."""
    seed = _hash32(DROPOUT_BATCH.to(x.device) ^ salt)
    index = torch.arange(x.numel(), dtype=torch.int32, device=x.device).view(x.shape)
    keep = (_hash32(index + seed) & 0xFFFF) >= round(p * 65536)
    return x * keep * (1.0 / (1.0 - p))


def lean_lora_forward(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's forward of a LoRA linear layer, base(x) + B(A(x)) * scale, in its common case (one active
    adapter, no DoRA, not merged) computed as base(x) + B(A(x) * scale), which is the same function
    with a cheaper backward pass:
    - the scale multiplies the rank-sized product, so the backward scales a [tokens, rank] gradient
      instead of writing a scaled copy of the [tokens, out_features] one in every layer;
    - under autocast the input goes to A as it is; peft casts it to the adapter's fp32 first, only
      for autocast to cast it back, and that round trip shows up in the backward pass too.
    - dropout's mask is hashed, not drawn (hashed_dropout).
    Any other case takes peft's own forward."""
    names = layer.active_adapters
    if (layer.disable_adapters or layer.merged or kwargs.get("adapter_names") is not None or len(names) != 1
            or names[0] not in layer.lora_A or names[0] in layer.lora_variant):
        return type(layer).forward(layer, x, *args, **kwargs)
    name = names[0]
    result = layer.base_layer(x, *args, **kwargs)
    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    if not torch.is_autocast_enabled(x.device.type):
        x = x.to(lora_a.weight.dtype)
    dropout = layer.lora_dropout[name]
    if isinstance(dropout, torch.nn.Dropout) and dropout.training and dropout.p > 0:
        x = hashed_dropout(x, dropout.p, layer.dropout_salt)
    update = lora_b(lora_a(x) * layer.scaling[name])
    return (result + update).to(result.dtype)
