"""Cross-entropy over answer tokens that never holds [answer tokens x vocabulary] logits at once.

When the model's parameters are sharded (FSDP, DeepSpeed ZeRO-3) the head's weight is not whole
outside its own forward, and the model applies the head itself (to answer positions only).

The model runs with its output head swapped for identity, so it returns the final hidden states
at the answer positions only (`logits_to_keep` as a boolean mask: prompt tokens never reach the
head). The head is then applied CHUNK rows at a time under activation checkpointing: each
chunk's logits are freed after its loss and recomputed in backward. With a 49k vocabulary and
~1000 answer tokens per batch this removes most of the logits' memory (fp32 copy, softmax,
gradient) for one extra head matmul.
"""

import contextlib

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tunelab.data.encode import IGNORE

CHUNK = 512


def token_loss_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Sum of cross-entropy over the answer tokens of a batch, and how many there are."""
    labels = batch["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    targets = labels[:, 1:][labels[:, 1:] != IGNORE]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    head = _plain_head(model)
    if head is None:  # a head with extras (soft-capping, scaling): let the model apply it
        logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
        logits = logits.reshape(-1, logits.shape[-1])
        return F.cross_entropy(logits.float(), targets, reduction="sum"), int(targets.numel())
    with _identity(head):
        hidden = model(**inputs, logits_to_keep=keep, use_cache=False).logits
    hidden = hidden.reshape(-1, hidden.shape[-1])
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), CHUNK):
        end = start + CHUNK
        total = total + checkpoint(_chunk_loss, hidden[start:end], head.weight, targets[start:end],
                                   use_reentrant=False)
    return total, int(targets.numel())


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight)
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def _plain_head(model):
    """The output head if it is a bias-free linear layer the model applies as is, else None."""
    config = getattr(model, "config", None)
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get else None
    if type(head) is not torch.nn.Linear or head.bias is not None or not _whole_here(head.weight, head):
        return None
    return head


def _whole_here(weight, head) -> bool:
    """False when FSDP or DeepSpeed ZeRO-3 shards the weight: outside the module's own forward this
    process then holds a piece (a DTensor, or an empty placeholder), so only the module can apply it."""
    if hasattr(weight, "ds_id") or type(weight.data).__name__ == "DTensor":
        return False
    return tuple(weight.shape) == (head.out_features, head.in_features)


@contextlib.contextmanager
def _identity(module: torch.nn.Module):
    module.forward = _pass_through
    try:
        yield
    finally:
        del module.forward


def _pass_through(x):
    return x
