"""train.optimizer_in_backward: each weight stepped, and its gradient freed, inside backward."""

import pytest
import torch

import tunelab
from conftest import full_config, train_until_first_checkpoint
from tunelab.config import load_config
from tunelab.errors import ConfigError
from tunelab.runs import read_metrics
from tunelab.training.optim import step_in_backward


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def tied_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    embed, hidden = torch.nn.Embedding(50, 16), torch.nn.Linear(16, 16)
    head = torch.nn.Linear(16, 50, bias=False)
    head.weight = embed.weight  # used twice, as tied embeddings are
    return torch.nn.ModuleDict({"embed": embed, "hidden": hidden, "head": head})


def forward_loss(m, tokens) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(m["head"](torch.tanh(m["hidden"](m["embed"](tokens)))), tokens)


def test_each_step_sees_one_gradient_and_matches_the_ordinary_step():
    tokens = torch.randint(0, 50, (32,))
    ordinary, stepped = tied_mlp(), tied_mlp()
    opt_a = torch.optim.AdamW(ordinary.parameters(), lr=1e-2, fused=True)
    opt_b = torch.optim.AdamW(stepped.parameters(), lr=1e-2, fused=True)
    live = []
    original_step = opt_b.step

    def counting_step(*args, **kwargs):
        live.append(sum(p.grad is not None for p in stepped.parameters()))
        return original_step(*args, **kwargs)
    step_in_backward(stepped, opt_b)
    # the moments exist before the first backward, and making them moved no weight
    assert all(opt_b.state[p]["exp_avg"].shape == p.shape for p in stepped.parameters())
    for a, b in zip(ordinary.parameters(), stepped.parameters()):
        torch.testing.assert_close(a, b)
    opt_b.step = counting_step
    for _ in range(3):
        forward_loss(ordinary, tokens).backward()
        opt_a.step()
        opt_a.zero_grad()
        forward_loss(stepped, tokens).backward()
        assert all(p.grad is None for p in stepped.parameters())
    assert live == [1] * 9  # 3 weights (the tied one once) x 3 steps, each alone with its gradient
    for (name, a), b in zip(ordinary.named_parameters(), stepped.parameters()):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("method, weight_dtype, optimizer", [
    ("full", "fp32", "adamw"), ("full", "bf16", "adamw"), ("full", "fp32", "adamw_8bit"), ("lora", "fp32", "adamw")])
def test_a_run_stepped_in_backward_trains_as_the_ordinary_one(tiny_config, method, weight_dtype, optimizer):
    """Without clipping or accumulation the two give the same losses and weights; the tiny model's
    embeddings are tied. bf16 weights: AdamWBf16's stochastic rounding draws the same noise."""
    runs = []
    for in_backward in (False, True):
        cfg = full_config(tiny_config, f"ib-{method}-{weight_dtype}-{optimizer}-{in_backward}", micro_batch_size=4,
                          grad_accum_steps=1, max_grad_norm=0.0, optimizer_in_backward=in_backward,
                          weight_dtype=weight_dtype, optimizer=optimizer)
        runs.append(tunelab.train({**cfg, "method": method}, quiet=True).run_dir)
    assert losses(runs[1]) == pytest.approx(losses(runs[0]), rel=1e-5)
    assert losses(runs[1])[-1] < losses(runs[1])[0]
    from safetensors.torch import load_file

    name = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    a, b = (load_file(r / "final" / name) for r in runs)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)


def test_resume_continues_with_the_same_losses(tiny_config):
    base = full_config(tiny_config, "straight", micro_batch_size=4, grad_accum_steps=1, max_grad_norm=0.0,
                       optimizer_in_backward=True, max_steps=6, save_every_n_steps=3)
    straight = losses(tunelab.train(base, quiet=True).run_dir)
    train_until_first_checkpoint({**base, "name": "resumed"})
    result = tunelab.train({**base, "name": "resumed"}, resume=True, quiet=True)
    assert result.steps == 6
    assert losses(result.run_dir) == pytest.approx(straight, rel=1e-5)


@pytest.mark.parametrize("override, named", [
    ({"max_grad_norm": 1.0}, "train.max_grad_norm=0"),
    ({"max_grad_norm": 0.0, "grad_accum_steps": 2}, "train.grad_accum_steps=1"),
])
def test_what_it_cannot_do_is_a_clear_error(tiny_config, override, named):
    cfg = full_config(tiny_config, "bad", optimizer_in_backward=True, **override)
    with pytest.raises(ConfigError, match=named):
        load_config(cfg)


def test_the_plan_counts_only_the_gradients_that_exist_at_once():
    flags = ["method=full", "train.grad_accum_steps=1", "train.max_grad_norm=0"]
    ordinary = tunelab.plan(model="360m", overrides=flags, timing=False).breakdown
    stepped = tunelab.plan(model="360m", overrides=[*flags, "train.optimizer_in_backward=true"],
                           timing=False).breakdown
    assert stepped.terms["gradients"] < ordinary.terms["gradients"] / 5
    assert stepped.peak < ordinary.peak
