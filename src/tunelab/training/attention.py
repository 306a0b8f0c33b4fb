"""Packed ("varlen") attention for CPU and GPU without flash-attn: causal SDPA per packed example.

With several examples packed into one row, transformers' SDPA path builds a T x T block-diagonal
mask and computes attention over all T^2 pairs, then masks most of them away; with 8 examples of
~200 tokens that is ~7x the work of the blocks themselves (measured: attention was 48% of a
SmolLM2 LoRA step here). This function runs `scaled_dot_product_attention(is_causal=True)` on
each example's slice instead (its fast flash kernel, no mask), using the `cu_seq_lens_q`
boundaries the collator passes, as flash-attn's varlen kernels do. Batches without those
boundaries (padded batches, generation) fall through to transformers' own SDPA.

Inside torch.compile, and uncompiled where tunelab's C++ kernels run it, the same attention is one
custom op instead:
- on CPUs where the kernels build (kernels.py, csrc/packed_attention.cpp), forward and backward are
  one call per layer for all examples, over 64 x 64 tiles of each causal score matrix;
- elsewhere the forward is the CPU flash kernel example by example, keeping its log-sum-exp, and
  the backward our own per example: recompute the scores with one matmul, softmax from the saved
  log-sum-exp, then four more matmuls, the elementwise work fused by torch.compile;
- per layer of the bench's batch, forward + backward take 41.7 ms with PyTorch's flash kernels, 20.9
  ms on the PyTorch path, 9.5 ms with the kernels (bench/attention_backward.py, bench/RESULTS.md);
- being one opaque op, it lets torch.compile see the whole decoder as one graph: the per-example
  loop (a .tolist() of the boundaries) otherwise breaks the graph in every layer.
"""

import functools

import torch
import torch.nn.functional as F

from tunelab.training import kernels

NAME = "tunelab_packed_sdpa"
_registered = False


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None or attention_mask is not None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    # a custom op is invisible to autocast: cast as autocast casts SDPA (rope leaves q, k in fp32
    # when the weights are, while v comes out of the matmul in bf16)
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype
    # the op runs CPU kernels (on a GPU the SDPA loop below runs, compiled or not). Uncompiled, it
    # pays only with tunelab's C++ kernels: its PyTorch backward would compile itself first
    if query.device.type == "cpu" and not (dropout and module.training) and (
            torch.compiler.is_compiling() or kernels.attention_kernels(dtype, query.shape[-1]) is not None):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
        out, _ = torch.ops.tunelab.packed_attention(query, key, value, bounds, scale)
        return out.transpose(1, 2).contiguous(), None
    gqa = key.shape[1] != query.shape[1]
    cuts = bounds.tolist()
    parts = [F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True,
                                            dropout_p=dropout if module.training else 0.0, scale=scaling,
                                            enable_gqa=gqa)
             for a, b in zip(cuts[:-1], cuts[1:])]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


@torch.library.custom_op("tunelab::packed_attention", mutates_args=())
def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: torch.Tensor,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention within each packed example. q [1, H, T, D]; k, v [1, KV, T, D] (KV divides H).
    Returns the output [1, H, T, D] and the log-sum-exp of the scaled scores [1, H, T] (fp32)."""
    fused = kernels.attention_kernels(q.dtype, q.shape[-1]) if q.device.type == "cpu" else None
    if fused is not None:
        return fused.packed_attention_forward(*_dense_rows(q, k, v), bounds, scale)
    outs, lses = [], []
    cuts = bounds.tolist()
    for a, b in zip(cuts[:-1], cuts[1:]):  # the CPU flash kernel takes grouped K/V heads as they are
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True, scale=scale)[:2]
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _dense_rows(*tensors):
    """The C++ kernels take any token and head strides but need each head's D values side by side."""
    return [t if t.stride(-1) == 1 else t.contiguous() for t in tensors]


@packed_attention.register_fake
def _(q, k, v, bounds, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("tunelab::packed_attention_backward", mutates_args=())
def packed_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              out: torch.Tensor, lse: torch.Tensor, bounds: torch.Tensor,
                              scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fused = kernels.attention_kernels(q.dtype, q.shape[-1]) if q.device.type == "cpu" else None
    if fused is not None:
        dq, dk, dv = fused.packed_attention_backward(*_dense_rows(grad_out, q, k, v, out), lse, bounds, scale)
        return dq, dk, dv
    dq, dk, dv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous, as the fake says
    cuts = bounds.tolist()
    backward = _compiled_example_backward()
    for a, b in zip(cuts[:-1], cuts[1:]):
        dq[0, :, a:b], dk[0, :, a:b], dv[0, :, a:b] = backward(
            grad_out[0, :, a:b], q[0, :, a:b], k[0, :, a:b], v[0, :, a:b], out[0, :, a:b], lse[0, :, a:b], scale)
    return dq, dk, dv


@packed_attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, bounds, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _example_backward(grad_out, q, k, v, out, lse, scale: float):
    """Gradients of causal attention for one example: q, out, grad_out [H, L, D], k, v [KV, L, D],
    lse [H, L]. Query heads h use K/V head h // (H / KV), so grouping the queries by their K/V head
    turns every product into one batched matmul of KV x (H / KV x L) rows."""
    heads, n, d = q.shape
    kv = k.shape[0]
    g = heads // kv
    qg, dog = q.reshape(kv, g * n, d), grad_out.reshape(kv, g * n, d)
    i = torch.arange(n, device=q.device)
    causal = i[:, None] >= i[None, :]
    scores = torch.bmm(qg, k.transpose(1, 2)).float().view(kv, g, n, n) * scale
    p = torch.where(causal, torch.exp(scores - lse.view(kv, g, n, 1)), 0.0)
    dv = torch.bmm(p.to(q.dtype).view(kv, g * n, n).transpose(1, 2), dog)
    dp = torch.bmm(dog, v.transpose(1, 2)).float().view(kv, g, n, n)
    delta = (grad_out.float() * out.float()).sum(-1).view(kv, g, n, 1)
    ds = (p * (dp - delta) * scale).to(q.dtype).view(kv, g * n, n)
    dq = torch.bmm(ds, k).view(heads, n, d)
    dk = torch.bmm(ds.transpose(1, 2), qg)
    return dq, dk, dv


def _setup_context(ctx, inputs, output):
    q, k, v, bounds, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bounds)
    ctx.scale = scale


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, bounds = ctx.saved_tensors
    dq, dk, dv = torch.ops.tunelab.packed_attention_backward(grad_out.contiguous(), q, k, v, out, lse, bounds,
                                                             ctx.scale)
    return dq, dk, dv, None, None


packed_attention.register_autograd(_backward, setup_context=_setup_context)


@functools.cache
def _compiled_example_backward():
    """_example_backward compiled once for every example length (dynamic shapes)."""
    return torch.compile(_example_backward, dynamic=True)


def _no_mask_when_packed(*args, attention_mask=None, **kwargs):
    """No T x T mask for packed rows (the attention above needs none); padded batches get SDPA's."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def use_packed_attention(model) -> bool:
    """Switch a transformers model to packed attention; False if the model cannot (it keeps SDPA)."""
    global _registered
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if not _registered:
        AttentionInterface.register(NAME, packed_sdpa_attention)
        AttentionMaskInterface.register(NAME, _no_mask_when_packed)
        _registered = True
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, AttributeError):
        return False
    return True


