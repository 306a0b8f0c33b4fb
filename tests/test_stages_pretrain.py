"""stage: pretrain on the shipped corpus slice: from scratch (own tokenizer) and continued."""

import json
from pathlib import Path

import pytest

import tunelab
from tunelab.errors import ConfigError

CORPUS = Path(__file__).parent / "assets" / "corpus" / "war_and_peace_slice.txt"


def _cfg(tmp_path, **extra) -> dict:
    cfg = {"name": "pt", "output_dir": str(tmp_path / "runs"), "seed": 0, "stage": "pretrain", "method": "full",
           "model": {"dtype": "fp32"},
           "data": {"train": str(CORPUS), "val_fraction": 0.1, "max_seq_len": 64},
           "train": {"max_steps": 20, "micro_batch_size": 8, "grad_accum_steps": 1, "learning_rate": 3e-3,
                     "eval_every_n_steps": 0, "save_every_n_steps": 0, "warmup_steps": 2}}
    for k, v in extra.items():
        cfg.setdefault(k, {}).update(v) if isinstance(v, dict) else cfg.update({k: v})
    return cfg


def test_from_scratch_trains_tokenizer_and_lowers_validation_loss(tmp_path):
    cfg = _cfg(tmp_path, pretrain={"from_scratch": "llama-tiny", "vocab_size": 600})
    result = tunelab.train(cfg, quiet=True)
    assert result.val_loss_after < result.val_loss_before - 0.5, (result.val_loss_before, result.val_loss_after)
    final = result.run_dir / "final"
    tok = json.loads((final / "tokenizer.json").read_text())
    assert len(tok["model"]["vocab"]) == 600  # trained on the corpus with the configured size
    assert (result.run_dir / "tokenizer" / "tokenizer.json").is_file()
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["stage"] == "pretrain"
    model, tokenizer = tunelab.load_model(str(final), dtype="fp32", device="cpu")
    assert model.config.vocab_size == len(tokenizer) == 600
    assert tokenizer.decode(tokenizer("Prince Andrew")["input_ids"]) == "Prince Andrew"  # byte-level round trip


def test_from_scratch_with_bf16_weights_lowers_validation_loss(tmp_path):
    """The new model starts in fp32; train.weight_dtype bf16 trains (and saves) it in bf16."""
    cfg = _cfg(tmp_path, pretrain={"from_scratch": "llama-tiny", "vocab_size": 600}, train={"weight_dtype": "bf16"})
    result = tunelab.train(cfg, quiet=True)
    assert result.val_loss_after < result.val_loss_before - 0.5, (result.val_loss_before, result.val_loss_after)
    from safetensors.torch import load_file

    assert {str(t.dtype) for t in load_file(result.run_dir / "final" / "model.safetensors").values()} == {"torch.bfloat16"}


def test_continued_pretraining_lowers_validation_loss(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, model={"ref": str(tiny_model_dir)}, method="lora",
               lora={"rank": 8, "alpha": 16, "dropout": 0.0}, train={"learning_rate": 1e-2, "max_steps": 15})
    result = tunelab.train(cfg, quiet=True)
    assert result.val_loss_after < result.val_loss_before
    report = json.loads((result.run_dir / "data_report.json").read_text())
    # every token is a target: one per token but the first of each chunk
    assert report["train"]["target_tokens"] == report["train"]["tokens"] - report["train_examples"]


def test_from_scratch_config_errors(tmp_path):
    with pytest.raises(ConfigError) as e:
        tunelab.load_config(_cfg(tmp_path, method="lora", pretrain={"from_scratch": "llama-tiny"}))
    assert "method: full" in str(e.value)
    with pytest.raises(ConfigError) as e:
        tunelab.load_config(_cfg(tmp_path, stage="sft", pretrain={"from_scratch": "llama-tiny"}))
    assert "stage: pretrain" in str(e.value)
    with pytest.raises(ConfigError, match="neither a named size"):
        tunelab.train(_cfg(tmp_path, pretrain={"from_scratch": "nope-size"}), quiet=True)
