"""NEFTune (noise on input embeddings in training only, scale alpha/sqrt(L*d)) and DoRA (magnitude vectors)."""

import json
import math

import pytest
import torch

import tunelab
from tunelab.config.schema import LoraConfig
from tunelab.errors import ConfigError
from tunelab.training.lora import apply_lora
from tunelab.training.neftune import enable_neftune


def _model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def test_neftune_noise_only_in_training_with_documented_scale(tiny_model_dir):
    model = _model(tiny_model_dir)
    ids = torch.randint(0, 1000, (2, 50))
    model.eval()
    with torch.no_grad():
        plain_logits = model(input_ids=ids).logits
        plain_emb = model.get_input_embeddings()(ids)
    alpha = 5.0
    handle = enable_neftune(model, alpha)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, plain_logits)  # eval: untouched
        model.train()
        noisy = model.get_input_embeddings()(ids)
    noise = noisy - plain_emb
    scale = alpha / math.sqrt(ids.shape[1] * plain_emb.shape[-1])  # alpha / sqrt(L * d)
    assert noise.abs().max() <= scale + 1e-6
    assert noise.abs().max() > 0.95 * scale  # uniform on [-scale, scale]: the extremes are reached
    assert abs(noise.std().item() - scale / math.sqrt(3)) < 0.1 * scale
    assert abs(noise.mean().item()) < 0.05 * scale
    handle.remove()
    with torch.no_grad():
        assert torch.equal(model.get_input_embeddings()(ids), plain_emb)


def test_neftune_in_the_loop_changes_training_not_validation(tiny_config):
    tiny_config["train"]["max_steps"] = 1
    plain = tunelab.train(tiny_config, quiet=True)
    noisy = tunelab.train(tiny_config, {"train.neftune_alpha": 50.0}, quiet=True)
    assert noisy.val_loss_before == pytest.approx(plain.val_loss_before, abs=1e-6)  # eval sees no noise
    loss = lambda r: [m for m in map(json.loads, (r.run_dir / "metrics.jsonl").read_text().splitlines())  # noqa: E731
                      if "loss" in m][0]["loss"]
    assert loss(noisy) != pytest.approx(loss(plain), abs=1e-6)  # training does
    with pytest.raises(ConfigError, match="neftune_alpha"):
        tunelab.load_config(tiny_config, {"train.neftune_alpha": -1})


def test_dora_adds_one_magnitude_vector_per_adapted_layer(tiny_model_dir):
    lora = apply_lora(_model(tiny_model_dir), LoraConfig(rank=4, alpha=8, dropout=0.0))
    dora = apply_lora(_model(tiny_model_dir), LoraConfig(rank=4, alpha=8, dropout=0.0, use_dora=True))
    mags = {n: p for n, p in dora.named_parameters() if "lora_magnitude_vector" in n}
    n_adapted = sum(1 for n, _ in dora.named_parameters() if "lora_A" in n)
    assert not any("magnitude" in n for n, _ in lora.named_parameters())
    assert len(mags) == n_adapted > 0
    assert all(p.requires_grad and p.ndim == 1 for p in mags.values())
    extra = sum(p.numel() for p in mags.values())
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert count(dora) - count(lora) == extra
    # the magnitude starts as each weight row's norm, so DoRA starts exactly at the base model
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        assert torch.allclose(dora(input_ids=ids).logits, lora(input_ids=ids).logits, atol=1e-5)


def test_dora_run_saves_and_reloads_magnitudes(tiny_config):
    from safetensors.torch import load_file

    result = tunelab.train(tiny_config, {"lora.use_dora": True, "train.max_steps": 2}, quiet=True)
    weights = load_file(result.final_dir / "adapter_model.safetensors")
    assert any("lora_magnitude_vector" in k for k in weights)
    assert json.loads((result.final_dir / "adapter_config.json").read_text())["use_dora"] is True
    model, _ = tunelab.load_model(str(result.run_dir), dtype="fp32", device="cpu")
    assert any("lora_magnitude_vector" in n for n, _ in model.named_parameters())
