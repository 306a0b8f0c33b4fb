"""train.optimizer: adamw_8bit (bitsandbytes' 8-bit AdamW) for full fine-tuning on the tiny model."""

import importlib.util

import pytest
import torch

import tunelab
from conftest import full_config, train_until_first_checkpoint
from tunelab.config import load_config
from tunelab.errors import ConfigError
from tunelab.runs import read_metrics

pytest.importorskip("bitsandbytes")


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def test_8bit_adamw_learns_like_adamw_with_a_quarter_of_the_state(tiny_config):
    runs = {opt: tunelab.train(full_config(tiny_config, opt, optimizer=opt, max_steps=8, save_every_n_steps=4), quiet=True).run_dir
            for opt in ("adamw", "adamw_8bit")}
    curve, reference = losses(runs["adamw_8bit"]), losses(runs["adamw"])
    assert sum(curve[-2:]) / 2 < sum(curve[:2]) / 2 - 0.4  # ~10.85 -> ~10.0
    # quantized moments, nearly the same steps: within 0.5% of fp32 AdamW at every step
    assert curve == pytest.approx(reference, rel=5e-3)
    states = {opt: torch.load(run / "checkpoints" / "step-000004" / "optimizer.pt", weights_only=True)
              for opt, run in runs.items()}
    size = {opt: sum(t.numel() * t.element_size() for t in _tensors(s["state"])) for opt, s in states.items()}
    # the 49k x 32 embedding dominates the tiny model: its moments are uint8 (+ a scale per 256)
    assert any(t.dtype == torch.uint8 for t in _tensors(states["adamw_8bit"]["state"]))
    assert size["adamw_8bit"] < 0.3 * size["adamw"], size


def test_8bit_adamw_resumes_with_the_same_losses(tiny_config):
    base = full_config(tiny_config, "adamw_8bit", optimizer="adamw_8bit", max_steps=6, save_every_n_steps=3)
    straight = losses(tunelab.train({**base, "name": "straight"}, quiet=True).run_dir)
    train_until_first_checkpoint({**base, "name": "resumed"})  # dies after its step-3 checkpoint
    result = tunelab.train({**base, "name": "resumed"}, resume=True, quiet=True)
    assert result.steps == 6
    # the quantized moments and their scales come back exactly; fresh moments would change step 4 on
    assert losses(result.run_dir) == pytest.approx(straight, rel=1e-6)


def test_config_names_the_optimizers_and_the_missing_package(monkeypatch):
    assert load_config({"data": {"train": "x"}, "train": {"optimizer": "adamw_8bit"}}).train.optimizer == "adamw_8bit"
    with pytest.raises(ConfigError, match="train.optimizer='adam8bit' is not one of adamw, adamw_8bit; "
                                          "did you mean 'adamw_8bit'"):
        load_config({"data": {"train": "x"}, "train": {"optimizer": "adam8bit"}})
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError, match="adamw_8bit needs the bitsandbytes package.*pip install bitsandbytes"):
        load_config({"data": {"train": "x"}, "train": {"optimizer": "adamw_8bit"}})


def test_the_plan_counts_8bit_moments_when_the_config_asks_for_them(tiny_model_dir):
    def states(optimizer):
        cfg = {"method": "full", "model": {"ref": str(tiny_model_dir)}, "train": {"optimizer": optimizer}}
        result = tunelab.plan(cfg, devices=[], timing=False)
        return result.setup.optimizer, result.breakdown.terms["optimizer states"], result.breakdown.trainable_params

    (name8, bytes8, n), (name32, bytes32, _) = states("adamw_8bit"), states("adamw")
    assert (name8, name32) == ("adamw_8bit", "adamw")
    assert bytes32 == 8 * n and bytes8 == pytest.approx(2.03 * n, rel=1e-3)


def _tensors(state: dict):
    for value in state.values():
        if isinstance(value, dict):
            yield from _tensors(value)
        elif torch.is_tensor(value):
            yield value
