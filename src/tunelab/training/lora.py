"""LoRA adapters on a frozen base, through peft."""

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
        return peft.get_peft_model(model, lora)
    except ValueError as e:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                        if type(m).__name__ == "Linear"})
        raise ConfigError(f"lora.target_modules={targets!r}: {str(e).splitlines()[0][:160]}; this model's "
                          f"linear layers are: {', '.join(names)} (or use all-linear)") from None
