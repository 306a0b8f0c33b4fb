"""Packed ("varlen") attention for CPU and GPU without flash-attn: causal SDPA per packed example.

With several examples packed into one row, transformers' SDPA path builds a T x T block-diagonal
mask and computes attention over all T^2 pairs, then masks most of them away; with 8 examples of
~200 tokens that is ~7x the work of the blocks themselves (measured: attention was 48% of a
SmolLM2 LoRA step here). This function runs `scaled_dot_product_attention(is_causal=True)` on
each example's slice instead (its fast flash kernel, no mask), using the `cu_seq_lens_q`
boundaries the collator passes, as flash-attn's varlen kernels do. Batches without those
boundaries (padded batches, generation) fall through to transformers' own SDPA.
"""

import torch
import torch.nn.functional as F

NAME = "tunelab_packed_sdpa"
_registered = False


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None or attention_mask is not None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    gqa = key.shape[1] != query.shape[1]
    cuts = bounds.tolist()
    parts = [F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True,
                                            dropout_p=dropout if module.training else 0.0, scale=scaling,
                                            enable_gqa=gqa)
             for a, b in zip(cuts[:-1], cuts[1:])]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


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


