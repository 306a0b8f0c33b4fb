"""tunelab's LoRA forward (training/lora.py) is peft's function, with its own backward graph."""

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

from tunelab.config.schema import LoraConfig
from tunelab.training.lora import apply_lora


def _lora_model(model_dir, dtype=torch.float32, **lora):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = apply_lora(model, LoraConfig(**{"rank": 4, "alpha": 8, "dropout": 0.0, **lora}))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; a trained adapter has a visible update
            torch.nn.init.normal_(p, std=0.2)
    return model


def _use_peft_forward(model) -> int:
    """Drop tunelab's forward from every LoRA layer (the class's, peft's, takes over again)."""
    layers = [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer) and "forward" in vars(m)]
    for m in layers:
        del m.forward
    return len(layers)


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    loss.backward()
    return logits.detach(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_forward_matches_peft(tiny_model_dir, dtype):
    model = _lora_model(tiny_model_dir, dtype=dtype)
    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        ours, our_grads = _loss_and_grads(model, ids)
        # 2 layers x 7 linear layers: every one took tunelab's forward
        assert _use_peft_forward(model) == 14
        theirs, their_grads = _loss_and_grads(model, ids)
    assert set(our_grads) == set(their_grads) and len(our_grads) == 28
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert torch.allclose(ours, theirs, rtol=tol, atol=tol * theirs.abs().max())
    for name, g in their_grads.items():
        assert torch.allclose(our_grads[name], g, rtol=tol, atol=tol * g.abs().max()), name


def test_lora_forward_without_autocast_on_a_bf16_base(tiny_model_dir):
    """A bf16 base with fp32 adapters and no autocast (generation after training): the input is cast
    to the adapter's dtype, as peft does, and the output keeps the base's dtype."""
    model = _lora_model(tiny_model_dir, dtype=torch.bfloat16)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    ours = layer(x)
    _use_peft_forward(model)
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, layer(x))


def test_lora_forward_falls_back_to_peft(tiny_model_dir):
    """Disabled adapters give the base model's output; DoRA layers keep peft's own forward."""
    model = _lora_model(tiny_model_dir)
    ids = torch.tensor([[1, 5, 9, 200, 7]])
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        _use_peft_forward(model)
        with model.disable_adapter():
            assert torch.equal(base, model(input_ids=ids).logits)
    assert not torch.allclose(tuned, base)
    dora = _lora_model(tiny_model_dir, use_dora=True)
    with torch.no_grad():
        ours = dora(input_ids=ids).logits
        _use_peft_forward(dora)
        assert torch.allclose(ours, dora(input_ids=ids).logits, atol=1e-6)


def test_hashed_dropout_keeps_1_minus_p_scaled_and_differs_by_layer_and_batch():
    """tunelab's LoRA dropout (hashed, not drawn: training/lora.py) is nn.Dropout's function: each
    element kept with probability 1 - p and scaled by 1 / (1 - p); the mask is new for every layer
    and micro batch, and the same again for the same ones (a checkpoint's recompute, a resume)."""
    from tunelab.training.lora import hashed_dropout, set_dropout_batch

    x = torch.ones(4000, 64)
    salt = torch.tensor(12345, dtype=torch.int32)
    set_dropout_batch(0, 1)
    a = hashed_dropout(x, 0.1, salt)
    kept = a != 0
    assert kept.float().mean().item() == pytest.approx(0.9, abs=0.005)
    assert torch.allclose(a[kept], torch.tensor(1 / 0.9)) and a.mean().item() == pytest.approx(1.0, abs=0.01)
    assert torch.equal(hashed_dropout(x, 0.1, salt), a)
    assert (hashed_dropout(x, 0.1, salt + 1) != a).float().mean() > 0.1  # another layer
    set_dropout_batch(0, 2)
    assert (hashed_dropout(x, 0.1, salt) != a).float().mean() > 0.1  # another micro batch
    set_dropout_batch(1, 1)
    assert (hashed_dropout(x, 0.1, salt) != a).float().mean() > 0.1  # another seed
    assert kept[:, 0].float().mean().item() == pytest.approx(0.9, abs=0.03)  # no pattern by column


def test_lora_dropout_trains_and_is_off_in_eval(tiny_model_dir):
    """In training the adapters see dropped inputs (outputs change with the batch's mask); in eval
    mode the output is the adapters' without dropout, as peft's."""
    from tunelab.training.lora import set_dropout_batch

    model = _lora_model(tiny_model_dir, dropout=0.5)
    ids = torch.tensor([[1, 5, 9, 200, 7, 3, 11, 42]])
    model.eval()
    clean = model(input_ids=ids).logits
    _use_peft_forward(model)
    assert torch.allclose(model(input_ids=ids).logits, clean, atol=1e-5)
    model = _lora_model(tiny_model_dir, dropout=0.5).train()
    set_dropout_batch(0, 1)
    first = model(input_ids=ids).logits
    assert not torch.allclose(first, clean, atol=1e-3)
    assert torch.equal(model(input_ids=ids).logits, first)
    set_dropout_batch(0, 2)
    assert not torch.allclose(model(input_ids=ids).logits, first, atol=1e-3)
