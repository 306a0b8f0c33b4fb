"""LoRA adapters on a frozen base, through peft."""

import types

import torch

from tunelab.config.schema import LoraConfig
from tunelab.errors import ConfigError


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
    for module in model.modules():
        if type(module) is peft.tuners.lora.Linear:  # not the 4/8-bit (QLoRA) layers: their own forward
            module.forward = types.MethodType(lean_lora_forward, module)
    return model


def lean_lora_forward(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's forward of a LoRA linear layer, base(x) + B(A(x)) * scale, in its common case (one active
    adapter, no DoRA, not merged) computed as base(x) + B(A(x) * scale), which is the same function
    with a cheaper backward pass:
    - the scale multiplies the rank-sized product, so the backward scales a [tokens, rank] gradient
      instead of writing a scaled copy of the [tokens, out_features] one in every layer;
    - under autocast the input goes to A as it is; peft casts it to the adapter's fp32 first, only
      for autocast to cast it back, and that round trip shows up in the backward pass too.
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
    update = lora_b(lora_a(layer.lora_dropout[name](x)) * layer.scaling[name])
    return (result + update).to(result.dtype)
