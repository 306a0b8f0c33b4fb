"""Cross-entropy over answer tokens that never holds [answer tokens x vocabulary] logits at once.

The chunked loss runs inside the head module's own call (the model returns it in place of the
logits), so where FSDP or DeepSpeed ZeRO-3 shard the weights their hooks have gathered the head's
weight there, as for any layer.

The model runs with its output head's forward swapped for the loss: the head receives the final
hidden states at the answer positions only (`logits_to_keep` as a boolean mask: prompt tokens never
reach the head), and the product and the cross-entropy run CHUNK rows at a time; each chunk's gradient
(softmax - one-hot, times the head) is computed right there in the forward pass, as Liger's fused
linear cross-entropy does: the loss is a sum, so its gradient only needs scaling by the number
backward brings. A chunk's logits are freed before the next one, nothing is recomputed in
backward, and with a 49k vocabulary that is most of a step's memory and ~15% of its time saved
(bench/RESULTS.md).
"""

import functools

import torch
import torch.nn.functional as F

from tunelab.data.encode import IGNORE

# 256 rows x 49k vocabulary of bf16 logits (25 MB) stay in this CPU's cache between the head's product,
# the softmax and the gradient's product: 130 ms per 1024 rows against 215 ms with 512 (LoRA; full
# fine-tuning's head is no faster or slower), bench/RESULTS.md
CHUNK = 256
# The last, shorter chunk is padded with zero rows to a multiple of this. oneDNN builds a matmul kernel
# for every new row count (8-35 ms for the head's [rows x 49k] x [49k x 576] product, measured with
# ONEDNN_VERBOSE), and the last chunk's row count was new nearly every step; padded, it takes one of
# 8 sizes. Zero rows add nothing to the head's gradient and their loss is left out.
PAD_ROWS = 32


def token_loss_sum(model, batch: dict, compiled: bool = False) -> tuple[torch.Tensor, int]:
    """Sum of cross-entropy over the answer tokens of a batch, and how many there are.
    compiled: fuse each chunk's softmax and gradients with torch.compile (the trainer passes it when it
    compiles the model; it costs a few seconds once)."""
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
    chunk_fn = _compiled_chunk_loss_and_grads() if compiled else _chunk_loss_and_grads

    def loss_of(hidden):  # the head's forward for this call: its weight is whole here, even under FSDP
        hidden = hidden.reshape(-1, hidden.shape[-1])
        dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) else None
        return LinearCrossEntropy.apply(hidden, head.weight, targets, dtype, chunk_fn)

    head.forward = loss_of
    try:
        return model(**inputs, logits_to_keep=keep, use_cache=False).logits, int(targets.numel())
    finally:
        del head.forward


class LinearCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(hidden @ weight.T, targets)), chunk by chunk, gradients made in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype, chunk_loss_and_grads):
        dtype = dtype or hidden.dtype  # the matmul dtype: autocast's, else the hidden states'
        h, w = hidden.to(dtype), weight.to(dtype)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if want_h else None
        # summed in fp32 for fp32 (master) weights; bf16 weights take a bf16 sum of the few chunks
        grad_w = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, dtype)) if want_w else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, targets.numel(), CHUNK):
            rows = slice(start, start + CHUNK)
            chunk_h, chunk_targets, valid = _padded(h[rows], targets[rows])
            if not (want_h or want_w):
                logits = (chunk_h @ w.T).float()
                total += F.cross_entropy(logits[:valid], chunk_targets[:valid], reduction="sum")
                continue
            loss, chunk_grad_h = chunk_loss_and_grads(chunk_h, w, chunk_targets, grad_w, valid)
            total += loss
            if want_h:
                grad_h[rows] = chunk_grad_h[:valid]
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w = ctx.saved_tensors  # scaled in place: a fresh 49k x hidden tensor costs more
        return (grad_h.mul_(grad_total.to(grad_h.dtype)) if grad_h is not None else None,
                grad_w.mul_(grad_total).to(ctx.weight_dtype) if grad_w is not None else None, None, None, None)


def _padded(h: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The chunk's rows with zero rows appended up to a multiple of PAD_ROWS (target 0), and how many
    rows are real."""
    valid = len(targets)
    pad = -valid % PAD_ROWS
    if pad:
        h = F.pad(h, (0, 0, 0, pad))
        targets = F.pad(targets, (0, pad))
    return h, targets, valid


def _chunk_loss_and_grads(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, grad_w: "torch.Tensor | None",
                          valid: int):
    """Summed cross-entropy of the first `valid` rows of `h @ w.T` against `targets`, and the gradient
    for h (the rows after `valid` are zero padding: their gradient rows are not used, and they add
    nothing to w's); the gradient for w is added to `grad_w` in place. Gradients of the summed loss: the
    logits' is softmax - one-hot. Compiled, the softmax is one fused kernel and the one-hot a
    separate one-element-per-row update (a scatter inside the fused kernel made it twice as slow),
    and the bf16 product is summed into grad_w without an fp32 copy (bench/RESULTS.md)."""
    logits = h @ w.T
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    loss = (lse - x.gather(1, targets[:, None]).squeeze(1))[:valid].sum()
    grad = torch.exp(x - lse[:, None]).to(logits.dtype)
    grad[torch.arange(len(targets), device=grad.device), targets] -= 1
    if grad_w is not None:
        grad_w += grad.T @ h  # a bf16 product under autocast, summed in grad_w's dtype
    return loss, grad @ w


@functools.cache
def _compiled_chunk_loss_and_grads():
    return torch.compile(_chunk_loss_and_grads, dynamic=True)


def _plain_head(model):
    """The output head if it is a bias-free linear layer the model applies as is, else None."""
    config = getattr(model, "config", None)
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get else None
    # FSDP2 makes the head an instance of a subclass of its own (FSDPLinear), with Linear's forward
    if not isinstance(head, torch.nn.Linear) or type(head).forward is not torch.nn.Linear.forward or head.bias is not None:
        return None
    return head
