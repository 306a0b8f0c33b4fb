"""train.weight_dtype: bf16: full fine-tuning of bf16 weights with AdamWBf16 (bf16 moments, every
update rounded stochastically)."""

import pytest
import torch

import tunelab
import tunelab.training.optim as optim
from conftest import full_config, train_until_first_checkpoint
from tunelab.config import load_config
from tunelab.errors import ConfigError
from tunelab.runs import read_metrics
from tunelab.training.optim import AdamWBf16


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour():
    lo, hi = 1.0, 1.0 + 2 ** -7  # neighbouring bf16 values
    x = torch.full((200_000,), lo + 0.3 * (hi - lo))
    noise = optim._hash32(torch.arange(x.numel(), dtype=torch.int32) + 12345) & 0xFFFF
    r = optim._round_stochastic(x, noise)
    assert r.dtype == torch.bfloat16
    assert set(r.float().unique().tolist()) == {lo, hi}
    assert r.float().mean().item() == pytest.approx(x[0].item(), abs=2e-5)  # 30% of the way up, on average
    neg = optim._round_stochastic(-x, noise).float()
    assert neg.mean().item() == pytest.approx(-x[0].item(), abs=2e-5)


def test_the_tensor_hash_is_the_integer_one():
    """_hash32 works on int32 tensors (signed, wrapping, arithmetic shifts masked); _mix on Python
    ints: the same lowbias32 bits."""
    values = [0, 1, 5, 123456789, 2 ** 31 - 1, 2 ** 31 + 7, 2 ** 32 - 1]
    signed = torch.tensor([v - 2 ** 32 if v >= 2 ** 31 else v for v in values], dtype=torch.int32)
    assert [h & 0xFFFFFFFF for h in optim._hash32(signed).tolist()] == [optim._mix(v) for v in values]
    assert len({optim._mix(0, step, 1) for step in range(1000)}) == 1000


def test_updates_smaller_than_a_bf16_step_still_add_up():
    """lr 1e-4 on weights of 1.0: each update is 1/78 of a bf16 step there; round to nearest would
    leave every weight at 1.0 for ever."""
    p = torch.nn.Parameter(torch.ones(8192, dtype=torch.bfloat16))
    opt = AdamWBf16([p], lr=1e-4)
    for _ in range(60):
        p.grad = torch.ones_like(p)  # AdamW then steps by lr exactly: m / sqrt(v) = 1
        opt.step()
    assert p.float().mean().item() == pytest.approx(1 - 60e-4, abs=1e-4)
    assert opt.state[p]["exp_avg_sq"].dtype == torch.bfloat16


def test_a_few_steps_match_fp32_adamw_within_a_rounding_step():
    torch.manual_seed(0)
    start = torch.randn(64, 48).to(torch.bfloat16)
    ref, p = torch.nn.Parameter(start.float()), torch.nn.Parameter(start.clone())
    fp32 = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1)
    ours = AdamWBf16([p], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        g = torch.randn(64, 48).to(torch.bfloat16)
        ref.grad, p.grad = g.float(), g
        fp32.step()
        ours.step()
    moved = (ref.detach() - start.float()).abs().mean()  # ~0.03: several bf16 steps at |w| ~ 1
    error = (p.detach().float() - ref.detach()).abs()
    # bf16 keeps 8 bits: a rounding step is at most |w| / 128, and each of the 3 updates rounds once
    assert (error <= 3 * (ref.detach().abs() + 0.05) / 128).all()
    assert error.mean() < 0.25 * moved


def test_the_compiled_update_is_the_eager_one_bit_for_bit(monkeypatch):
    """Eager runs in slices (their rounding noise continues the element count), compiled runs each
    tensor whole: the same numbers either way."""
    monkeypatch.setattr(optim, "SLICE", 1000)
    torch.manual_seed(1)
    tensors = [torch.randn(301, 7).to(torch.bfloat16) for _ in range(4)]  # p, g, m, v
    tensors[3] = tensors[3].abs()
    scalars = [torch.tensor(x) for x in (0.5, 1e-3, 0.01, 0.9, 0.999, 0.1, 0.0316, 1e-8)] + [
        torch.tensor(77, dtype=torch.int32)]
    eager = [t.clone() for t in tensors]
    compiled = [t.clone() for t in tensors]
    with torch.no_grad():
        optim._adamw_bf16_update_in_slices(*eager, *scalars)
        optim._compiled_adamw_bf16_update()(*compiled, *scalars)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)
    assert not torch.equal(eager[0], tensors[0])


def test_the_compiled_update_compiles_once_per_rank_not_per_shape():
    """dynamo keeps a parameter's shape static, so the compiled update built one graph per distinct
    weight shape, and past its limit of 8 (a model with biases and an untied head) it ran eager; it
    now takes flat views: one graph for 1-D bases, one for 2-D, one for 3-D."""
    import torch._dynamo.utils

    shapes = [(7,), (5,), (4, 6), (3, 6), (9, 6), (6, 9), (11, 6), (6, 12), (13, 6), (2, 3, 4)]
    params = [torch.nn.Parameter(torch.randn(s).to(torch.bfloat16)) for s in shapes]
    opt = AdamWBf16(params, lr=1e-3, compiled=True)
    torch._dynamo.reset()
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before <= 3


def test_clipping_scales_the_gradients_inside_the_update():
    torch.manual_seed(2)
    ps = [torch.nn.Parameter(torch.randn(10, 10).to(torch.bfloat16)) for _ in range(2)]
    for p in ps:
        p.grad = (torch.randn(10, 10) * 3).to(torch.bfloat16)
    expected = torch.linalg.vector_norm(torch.cat([p.grad.float().flatten() for p in ps]))
    opt = AdamWBf16(ps, lr=1e-3)
    norm = opt.clip_grad_norm_(0.5)
    assert norm.item() == pytest.approx(expected.item(), rel=1e-3)
    grads = [p.grad.float().clone() for p in ps]
    opt.step()
    for p, g in zip(ps, grads):  # the first moment holds (1 - beta1) * the clipped gradient
        assert torch.allclose(opt.state[p]["exp_avg"].float(), 0.1 * g * 0.5 / norm, rtol=2e-2, atol=1e-4)
    assert opt.grad_scale.item() == 1.0  # once: the next step takes its gradients as they are


def test_bf16_weights_learn_like_fp32_master_weights_in_half_the_memory(tiny_config):
    runs = {wd: tunelab.train(full_config(tiny_config, wd, weight_dtype=wd, max_steps=8, save_every_n_steps=4), quiet=True).run_dir
            for wd in ("fp32", "bf16")}
    curve, reference = losses(runs["bf16"]), losses(runs["fp32"])
    assert sum(curve[-2:]) / 2 < sum(curve[:2]) / 2 - 0.4  # ~10.85 -> ~10.0, as fp32
    assert curve == pytest.approx(reference, rel=1e-2)
    from safetensors.torch import load_file

    weights = load_file(runs["bf16"] / "final" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    states = {wd: torch.load(run / "checkpoints" / "step-000004" / "optimizer.pt", weights_only=True)["state"]
              for wd, run in runs.items()}
    size = {wd: sum(t.numel() * t.element_size() for s in st.values() for t in s.values() if t.ndim)
            for wd, st in states.items()}
    assert size["bf16"] == size["fp32"] // 2


def test_bf16_weights_resume_with_the_same_losses(tiny_config):
    base = full_config(tiny_config, "bf16", weight_dtype="bf16", max_steps=6, save_every_n_steps=3)
    straight = losses(tunelab.train({**base, "name": "straight"}, quiet=True).run_dir)
    train_until_first_checkpoint({**base, "name": "resumed"})  # dies after its step-3 checkpoint
    result = tunelab.train({**base, "name": "resumed"}, resume=True, quiet=True)
    # the bf16 moments come back, and the rounding noise is a function of (seed, step, tensor): the same steps 4-6
    assert losses(result.run_dir) == pytest.approx(straight, rel=1e-6)


@pytest.mark.parametrize("settings,message", [
    ({"method": "lora"}, "train.weight_dtype=bf16 with method=lora: it is for full fine-tuning"),
    ({"method": "full", "train": {"optimizer": "adamw_8bit"}}, "use train.optimizer=adamw"),
    ({"method": "full", "stage": "dpo"}, "with stage=dpo: only the sft and pretrain stages"),
])
def test_config_says_where_bf16_weights_do_not_apply(settings, message):
    raw = {"data": {"train": "x"}, **settings, "train": {**settings.get("train", {}), "weight_dtype": "bf16"}}
    with pytest.raises(ConfigError, match=message):
        load_config(raw)


def test_config_names_the_weight_dtypes():
    assert load_config({"data": {"train": "x"}, "method": "full", "train": {"weight_dtype": "bf16"}}
                       ).train.weight_dtype == "bf16"
    with pytest.raises(ConfigError, match="train.weight_dtype='fp16' is not one of fp32, bf16"):
        load_config({"data": {"train": "x"}, "method": "full", "train": {"weight_dtype": "fp16"}})


def test_the_plan_counts_bf16_weights(tiny_model_dir):
    def plan(weight_dtype):
        cfg = {"method": "full", "model": {"ref": str(tiny_model_dir)}, "train": {"weight_dtype": weight_dtype}}
        return tunelab.plan(cfg, devices=[], timing=False).breakdown

    b16, b32 = plan("bf16"), plan("fp32")
    n = b16.trainable_params
    assert b16.terms["weights"] == 2 * n and b32.terms["weights"] == 4 * n
    assert b16.terms["optimizer states"] == 4 * n and b16.terms["gradients"] == 2 * n
    assert b16.terms["weight copies (autocast/dequant)"] == 0
    assert b16.peak < b32.peak - 8 * n
