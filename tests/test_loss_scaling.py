"""fp16 compute: the loss scaled for backward, overflowing steps skipped, the scale kept across a resume."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tunelab
from conftest import full_config, train_until_first_checkpoint
from tunelab.errors import RunError
from tunelab.hardware import resolve_dtype
from tunelab.runs import read_metrics
from tunelab.training import loss_scaling


def steps(run_dir) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "loss" in r]


def fp16(config: dict) -> dict:
    return {**config, "model": {**config["model"], "dtype": "fp16"}}


@pytest.mark.parametrize("method", ["full", "lora"])
def test_fp16_trains_as_fp32_with_its_loss_scaled(tiny_config, method, capsys):
    fp32_run = full_config(tiny_config, "fp32") if method == "full" else {**tiny_config, "name": "fp32"}
    reference = steps(tunelab.train(fp32_run, quiet=True).run_dir)
    assert "CPUs emulate fp16" not in capsys.readouterr().out
    run = tunelab.train(fp16({**fp32_run, "name": "fp16"}), quiet=True)
    assert "CPUs emulate fp16" in capsys.readouterr().out  # 7 tokens/s against ~500 in bf16 here
    got = steps(run.run_dir)
    assert [r["loss_scale"] for r in got] == [2.0 ** 16] * len(got)
    assert not any(r["skipped"] for r in got)
    for a, b in zip(reference, got):
        assert b["loss"] == pytest.approx(a["loss"], abs=5e-3)
    assert got[-1]["loss"] < got[0]["loss"] - 0.3
    assert "loss_scale" not in reference[0]  # fp32 and bf16 need no scaling


def test_an_overflowing_fp16_step_is_skipped_and_the_scale_halved(tiny_config, monkeypatch):
    monkeypatch.setattr(loss_scaling, "INIT_SCALE", 2.0 ** 40)  # the scaled gradients overflow fp16
    config = fp16(full_config(tiny_config, "overflow", max_steps=3, lr_scheduler="linear"))
    result = tunelab.train(config, quiet=True)
    got = steps(result.run_dir)
    assert [r["loss_scale"] for r in got] == [2.0 ** 39, 2.0 ** 38, 2.0 ** 37]
    assert all(r["skipped"] and r["grad_norm"] is None for r in got)
    assert len({r["lr"] for r in got}) == 1  # the schedule waits for steps actually taken
    start = load_file(Path(tiny_config["model"]["ref"]) / "model.safetensors")
    final = load_file(result.final_dir / "model.safetensors")
    assert set(start) == set(final)
    for name, weight in final.items():  # no weight moved
        torch.testing.assert_close(weight, start[name], rtol=0, atol=0, msg=name)


def test_a_resumed_fp16_run_keeps_its_loss_scale(tiny_config, monkeypatch):
    # 2^19 overflows this model's first steps and then trains: the scale changes during the run
    monkeypatch.setattr(loss_scaling, "INIT_SCALE", 2.0 ** 19)
    config = fp16(full_config(tiny_config, "whole", max_steps=6))
    whole = steps(tunelab.train(config, quiet=True).run_dir)
    assert any(r["skipped"] for r in whole) and not all(r["skipped"] for r in whole)
    cut = {**config, "name": "cut", "train": {**config["train"], "save_every_n_steps": 3}}
    train_until_first_checkpoint(cut)
    resumed = steps(tunelab.train(cut, resume=True, quiet=True).run_dir)
    assert [r["loss_scale"] for r in resumed] == [r["loss_scale"] for r in whole]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in whole], abs=1e-6)


@pytest.mark.parametrize("train, words", [
    ({"optimizer_in_backward": True, "max_grad_norm": 0, "grad_accum_steps": 1}, "optimizer_in_backward"),
    ({"weight_dtype": "bf16"}, "weight_dtype=bf16"),
])
def test_fp16_refuses_what_it_cannot_scale_before_loading(tiny_config, train, words):
    config = fp16(full_config(tiny_config, "refused", **train))
    with pytest.raises(RunError, match=words):
        tunelab.train(config, quiet=True)


def test_auto_is_fp16_on_gpus_without_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16


def test_fp16_under_deepspeed_is_refused_with_the_way_out():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from tunelab.config.schema import TrainConfig

    deepspeed = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=2)
    with pytest.raises(RunError, match="fp16 compute under DeepSpeed.*ddp.yaml or fsdp.yaml"):
        loss_scaling.loss_scaler(deepspeed, torch.float16, TrainConfig())
    assert loss_scaling.loss_scaler(deepspeed, torch.bfloat16, TrainConfig()) is None
