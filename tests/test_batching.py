"""Packing keeps examples apart: the same per-example loss as running them one by one."""

import torch

from tunelab.data.batching import collate_packed, collate_padded, epoch_order
from tunelab.data.encode import IGNORE, Encoded
from tunelab.training.loop import token_loss_sum


def _items():
    return [Encoded([5, 6, 7, 8, 9], [IGNORE, IGNORE, 7, 8, 9], "a"),
            Encoded([10, 11, 12], [IGNORE, 11, 12], "b"),
            Encoded([13, 14, 15, 16], [IGNORE, IGNORE, IGNORE, 16], "c")]


def test_packed_layout():
    b = collate_packed(_items())
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]]
    assert b["input_ids"].shape == (1, 12)
    # an example's first token never becomes a target of the previous example
    assert b["labels"][0, 5].item() == IGNORE and b["labels"][0, 8].item() == IGNORE


def test_packed_loss_equals_one_by_one(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
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
