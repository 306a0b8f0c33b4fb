"""Packing keeps examples apart: the same per-example loss as running them one by one."""

import pytest
import torch

from tunelab.data.batching import (bucket_length, collate, collate_packed, collate_padded, epoch_order,
                                   largest_batch_tokens)
from tunelab.data.encode import IGNORE, Encoded
from tunelab.training.loss import token_loss_sum


def _items():
    return [Encoded([5, 6, 7, 8, 9], [IGNORE, IGNORE, 7, 8, 9], "a"),
            Encoded([10, 11, 12], [IGNORE, 11, 12], "b"),
            Encoded([13, 14, 15, 16], [IGNORE, IGNORE, IGNORE, 16], "c")]


def test_packed_layout():
    b = collate_packed(_items())
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]]
    assert b["input_ids"].shape == (1, 12)
    assert b["cu_seq_lens_q"].tolist() == [0, 5, 8, 12]
    # an example's first token never becomes a target of the previous example
    assert b["labels"][0, 5].item() == IGNORE and b["labels"][0, 8].item() == IGNORE


def test_bucket_lengths_are_few_and_close():
    assert [bucket_length(n) for n in (1, 31, 200, 201, 1024, 1025, 1500, 2048, 2049)] == \
        [1, 31, 200, 208, 1024, 1088, 1536, 2048, 2176]
    lengths = [bucket_length(n) for n in range(1, 5000)]
    assert all(0 <= b - n <= n / 16 for n, b in zip(range(1, 5000), lengths))
    assert len({b for b in lengths if 1024 <= b < 2048}) == 16  # 16 per doubling


def _long_items():  # 20 + 10 + 3 = 33 tokens: a bucket of 34, one filler token
    return [Encoded(list(range(5, 25)), [IGNORE] * 10 + list(range(15, 25)), "a"),
            Encoded(list(range(30, 40)), [IGNORE] * 4 + list(range(34, 40)), "b"),
            Encoded([41, 42, 43], [IGNORE, 42, 43], "c")]


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("group_by_length", [False, True])
def test_largest_batch_tokens_is_the_largest_batch_training_collates(packing, group_by_length):
    """The memory check's batch for the data it knows: the largest micro batch, as `collate` makes it,
    over the epochs that run (their orders differ), not the worst case of rows x max_seq_len."""
    import random

    rng = random.Random(3)
    lengths = [rng.randint(3, 300) for _ in range(101)]
    items = [Encoded(list(range(n)), [IGNORE] + list(range(1, n)), str(i)) for i, n in enumerate(lengths)]

    def collated(epochs):
        return max(collate([items[i] for i in batch], packing, 0)["input_ids"].numel()
                   for e in range(epochs) for batch in epoch_order(lengths, 8, 0, e, group_by_length))

    one, three = (largest_batch_tokens(lengths, 8, 0, n, group_by_length, packing) for n in (1, 3))
    assert one == collated(1) and three == collated(3) and one <= three
    if packing and not group_by_length:  # shuffled rows: no batch holds the 8 longest, let alone 8 x max
        assert three < sum(sorted(lengths)[-8:])


def test_bucketed_packing_adds_a_filler_example():
    b = collate_packed(_long_items(), pad_id=2, bucket=True)
    assert b["input_ids"].shape == (1, 34) and b["input_ids"][0, -1].item() == 2
    assert b["cu_seq_lens_q"].tolist() == [0, 20, 30, 33, 34]  # the filler attends only to itself
    assert b["position_ids"][0, -1].item() == 0 and b["labels"][0, -1].item() == IGNORE
    assert collate_padded(_long_items(), pad_id=2, bucket=True)["input_ids"].shape == (3, 20)  # 20 is a bucket
    assert collate_padded(_long_items()[:1] + [Encoded(list(range(33)), [IGNORE] * 33, "d")], pad_id=2,
                          bucket=True)["attention_mask"].shape == (2, 34)


def test_the_filler_changes_no_loss_or_gradient(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from tunelab.training.attention import use_packed_attention

    results = []
    for bucket in (False, True):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        use_packed_attention(model)
        loss, n = token_loss_sum(model, collate_packed(_long_items(), pad_id=2, bucket=bucket))
        loss.backward()
        results.append((loss.detach(), n, model.model.layers[0].mlp.down_proj.weight.grad.clone(),
                        model.model.embed_tokens.weight.grad.clone()))
    (loss, n, g_down, g_embed), (loss_b, n_b, g_down_b, g_embed_b) = results
    assert n == n_b == 18
    assert torch.allclose(loss, loss_b, atol=1e-5)
    assert torch.allclose(g_down, g_down_b, atol=1e-6) and torch.allclose(g_embed, g_embed_b, atol=1e-6)


@pytest.mark.parametrize("attention", ["sdpa", "packed"])
def test_packed_loss_equals_one_by_one(tiny_model_dir, attention):
    from transformers import AutoModelForCausalLM

    from tunelab.training.attention import use_packed_attention

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    if attention == "packed":
        assert use_packed_attention(model)
    items = _items()
    packed, n_packed = token_loss_sum(model, collate_packed(items))
    singles = [token_loss_sum(model, collate_packed([e])) for e in items]
    padded, n_padded = token_loss_sum(model, collate_padded(items, pad_id=0))
    assert n_packed == sum(n for _, n in singles) == n_padded == 6
    assert torch.allclose(packed, sum(s for s, _ in singles), atol=1e-4)
    assert torch.allclose(padded, packed, atol=1e-4)


def test_epoch_order_is_deterministic_and_complete():
    lengths = list(range(23))
    a = epoch_order(lengths, 4, seed=1, epoch=0)
    assert a == epoch_order(lengths, 4, seed=1, epoch=0)
    assert a != epoch_order(lengths, 4, seed=1, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(23))
    g = epoch_order(lengths, 4, seed=1, epoch=0, group_by_length=True)
    assert sorted(i for b in g for i in b) == list(range(23))
    assert all(max(b) - min(b) <= 4 for b in g[:-1] if len(b) == 4)  # near-equal lengths together


def test_packed_attention_gradients_match_sdpa(tiny_model_dir):
    """Same loss and same gradients as transformers' masked SDPA on the packed row."""
    from transformers import AutoModelForCausalLM

    from tunelab.training.attention import use_packed_attention

    grads = []
    for packed in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        if packed:
            use_packed_attention(model)
        loss, _ = token_loss_sum(model, collate_packed(_items()))
        loss.backward()
        grads.append((loss.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-5)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-6)


@pytest.mark.parametrize("backward", ["kernel", "eager", "compiled"])
def test_packed_attention_op_matches_sdpa(backward, monkeypatch):
    """The custom op used inside torch.compile: same output and gradients as SDPA example by example,
    with grouped K/V heads (6 query heads on 2 K/V heads), by each backward: the C++ kernel, and the
    per-example PyTorch path (eager and compiled) where the kernel is not available."""
    import torch.nn.functional as F

    from tunelab.training import attention, kernels

    if backward == "kernel":
        if kernels.missing_prerequisite():
            pytest.skip(kernels.missing_prerequisite())
        assert kernels.attention_kernels(torch.float32, 16) is not None, "the kernels did not build"
    else:
        monkeypatch.setattr(kernels, "attention_kernels", lambda dtype, head_dim: None)
    if backward == "eager":
        monkeypatch.setattr(attention, "_compiled_example_backward", lambda: attention._example_backward)
    torch.manual_seed(0)
    bounds = torch.tensor([0, 5, 12, 31], dtype=torch.int32)
    q = torch.randn(1, 6, 31, 16, requires_grad=True)
    k, v = (torch.randn(1, 2, 31, 16, requires_grad=True) for _ in range(2))
    grad_out = torch.randn(1, 6, 31, 16)
    out, _ = torch.ops.tunelab.packed_attention(q, k, v, bounds, 0.3)
    out.backward(grad_out)
    ours = [out.detach()] + [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    cuts = bounds.tolist()
    ref = torch.cat([F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True,
                                                    scale=0.3, enable_gqa=True) for a, b in zip(cuts, cuts[1:])], 2)
    ref.backward(grad_out)
    for mine, theirs in zip(ours, [ref.detach()] + [t.grad for t in (q, k, v)]):
        assert torch.allclose(mine, theirs, atol=1e-5), (mine - theirs).abs().max()


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("chunk,pad_rows", [(4, 1), (4, 8)])
def test_chunked_loss_equals_full_logits_loss(tiny_model_dir, monkeypatch, compiled, chunk, pad_rows):
    """The chunked head with its gradient made in forward changes memory, not numbers: same loss, same
    gradients (the head is tied to the embeddings: both gradient paths must add up). 6 targets make
    chunks of 4 and 2 rows; with pad_rows 8 both are padded with zero rows, which must change nothing."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    import tunelab.training.loss as loss_mod

    monkeypatch.setattr(loss_mod, "CHUNK", chunk)
    monkeypatch.setattr(loss_mod, "PAD_ROWS", pad_rows)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    batch = collate_packed(_items())
    chunked, n = loss_mod.token_loss_sum(model, batch, compiled)
    chunked.backward()
    g_chunked = model.model.embed_tokens.weight.grad.clone()  # tied to the head: both paths meet here
    model.zero_grad()
    labels = batch["labels"][0]
    # use_cache=False: with a cache transformers ignores packed position ids and attends across examples
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0, :-1]
    direct = F.cross_entropy(logits, labels[1:], ignore_index=IGNORE, reduction="sum")
    direct.backward()
    assert n == 6
    assert torch.allclose(chunked, direct, atol=1e-4)
    # fp32 rounding only: gradients up to ~3.4 differ by <= 1.3e-5 on AMD Zen 4 (its GEMMs sum in
    # another order than AMX machines', 1e-6 there); a lost or doubled chunk would move them by ~0.1
    assert torch.allclose(g_chunked, model.model.embed_tokens.weight.grad, atol=5e-5)
    with torch.no_grad():  # the validation loss's path: no gradients made
        assert torch.allclose(loss_mod.token_loss_sum(model, batch, compiled)[0], direct, atol=1e-4)
    assert not hasattr(model.lm_head, "__dict__") or "forward" not in model.lm_head.__dict__  # head restored
