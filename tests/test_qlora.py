"""Quantized bases through bitsandbytes: 4-bit/8-bit loading, QLoRA training, loading and export."""

import pytest
import torch

import tunelab
from tunelab.config import load_config
from tunelab.errors import ConfigError, ModelError
from tunelab.runs import read_metrics


pytest.importorskip("bitsandbytes")


@pytest.fixture
def qlora_config(tiny_config, tiny64_dir):
    return {**tiny_config, "method": "qlora", "model": {"ref": str(tiny64_dir), "dtype": "bf16"},
            "data": {**tiny_config["data"], "val_fraction": 0},
            "train": {**tiny_config["train"], "max_steps": 10}}


@pytest.mark.parametrize("kind, layer", [("nf4", "Linear4bit"), ("fp4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_quantized_loading_replaces_the_linear_layers(tiny64_dir, kind, layer):
    model, _ = tunelab.load_model(str(tiny64_dir), dtype="bf16", quantization=kind)
    proj = model.model.layers[0].mlp.up_proj
    assert type(proj).__name__ == layer
    full, _ = tunelab.load_model(str(tiny64_dir), dtype="bf16")
    assert model.get_memory_footprint() < full.get_memory_footprint()
    ids = torch.tensor([[1, 400, 500, 600, 700]])
    with torch.no_grad():
        q, f = model(input_ids=ids).logits.float(), full(input_ids=ids).logits.float()
    # quantization error, not garbage: the quantized model's predictions track the full one's
    assert torch.corrcoef(torch.stack([q.flatten(), f.flatten()]))[0, 1] > 0.9


def test_unknown_quantization_is_a_clear_error(tiny64_dir):
    with pytest.raises(ModelError, match="nf4, fp4, int8"):
        tunelab.load_model(str(tiny64_dir), quantization="int3")


def test_quantized_full_fine_tuning_is_refused(tiny_config):
    cfg = {**tiny_config, "method": "full", "model": {**tiny_config["model"], "quantization": "nf4"}}
    with pytest.raises(ConfigError, match="method=qlora"):
        load_config(cfg)


def test_qlora_trains_on_a_4bit_base_and_loads_back_quantized(qlora_config, tmp_path):
    result = tunelab.train(qlora_config, quiet=True)
    losses = [r["loss"] for r in read_metrics(result.run_dir) if "loss" in r]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, losses
    assert (result.run_dir / "final" / "adapter_model.safetensors").is_file()
    # the run loads as it was trained: 4-bit base + adapter
    model, tok = tunelab.load_model(str(result.run_dir), dtype="bf16")
    base_layer = model.base_model.model.model.layers[0].mlp.up_proj.base_layer
    assert type(base_layer).__name__ == "Linear4bit"
    # the merged export is full precision and close to the 4-bit model it came from
    out = tunelab.export(str(result.run_dir), format="merged", out=tmp_path / "merged")
    merged, _ = tunelab.load_model(str(out), dtype="fp32")
    assert type(merged.model.layers[0].mlp.up_proj).__name__ == "Linear"
    ids = tok("Label the sentiment. Great food!", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = model(input_ids=ids).logits.float(), merged(input_ids=ids).logits.float()
    assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.9


@pytest.mark.skipif(not __import__("bitsandbytes.functional").functional.has_avx512bf16(),
                    reason="bitsandbytes repacks 4-bit weights only on CPUs with AVX512-BF16")
def test_a_forward_outside_training_leaves_the_4bit_base_trainable(tiny64_dir):
    """Validation before training runs the model in eval mode, where bitsandbytes repacks its 4-bit
    weights for an inference-only kernel (no backward) that training would then take: apply_lora
    turns that off, so the gradients after a validation pass are those of a model never validated."""
    from tunelab.config.schema import LoraConfig
    from tunelab.training.lora import apply_lora

    def input_gradient(validate_first: bool) -> torch.Tensor:
        model, _ = tunelab.load_model(str(tiny64_dir), dtype="bf16", quantization="nf4")
        model = apply_lora(model, LoraConfig(rank=4, alpha=8, dropout=0.0))
        ids = torch.tensor([[1, 400, 500, 600, 700]])
        if validate_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
            model.train()
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
        model(inputs_embeds=embeds).logits.float().sum().backward()
        return embeds.grad

    torch.testing.assert_close(input_gradient(True), input_gradient(False))


def test_a_quantized_base_loads_on_the_processs_own_device(tiny_config):
    """accelerate cannot move bitsandbytes' weights after loading (it refuses to train them on
    another device): on a GPU node the 4-bit base must load on cuda:<local rank>, everything else on
    the CPU, for accelerate to move and FSDP or DeepSpeed to shard."""
    from types import SimpleNamespace

    from tunelab.config import load_config
    from tunelab.training.loop import base_device

    gpu1 = SimpleNamespace(device=torch.device("cuda", 1))
    assert base_device(gpu1, load_config({**tiny_config, "method": "qlora"})) == torch.device("cuda", 1)
    for method in ("lora", "full"):
        config = {**tiny_config, "method": method, "train": {**tiny_config["train"], "learning_rate": 1e-5}}
        assert base_device(gpu1, load_config(config)) == torch.device("cpu")
