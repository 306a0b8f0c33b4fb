"""tunelab's C++ CPU kernels: right gradients where they build, a clear word and the PyTorch path where not."""

import pytest
import torch
import torch.nn.functional as F

from tunelab.training import attention, kernels

# lengths around the 64-token tiles (1, 63, 64, 65, 130), head sizes a tile does not divide
SHAPES = [([1, 63, 64, 65, 130, 7], 6, 2, 64), ([5, 7, 19], 6, 2, 16), ([33, 100], 4, 4, 128),
          ([70], 3, 1, 48)]


def _float64_reference(q, k, v, grad_out, cuts, scale):
    """Output, log-sum-exp of the scaled causal scores, and gradients, example by example in float64."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = torch.cat([F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True,
                                                    scale=scale, enable_gqa=True) for a, b in zip(cuts, cuts[1:])], 2)
    out.backward(grad_out.double())
    lse = []
    for a, b in zip(cuts, cuts[1:]):
        kk = k[:, :, a:b].repeat_interleave(q.shape[1] // k.shape[1], 1)
        scores = (q[:, :, a:b] @ kk.transpose(-1, -2) * scale).masked_fill(
            torch.ones(b - a, b - a, dtype=torch.bool).triu(1), float("-inf"))
        lse.append(scores.logsumexp(-1))
    return out.detach(), torch.cat(lse, 2).detach(), (q.grad, k.grad, v.grad)


def _relative_errors(grads, ref):
    return [((g.double() - r).abs().max() / r.abs().max()).item() for g, r in zip(grads, ref)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("lengths,heads,kv_heads,head_dim", SHAPES)
def test_fused_attention_matches_float64(dtype, lengths, heads, kv_heads, head_dim, monkeypatch):
    """Forward (output, log-sum-exp) and backward against float64 SDPA example by example: fp32 to
    rounding; bf16 within bf16 rounding (< 1e-2) and of the per-example PyTorch path it replaces
    (at most 3x its error: each rounds at different points). Inputs strided as transformers passes
    them ([1, T, H, D] transposed)."""
    if kernels.missing_prerequisite() or (dtype == torch.bfloat16 and not kernels.bf16_tile_products()):
        pytest.skip("tunelab's C++ attention kernels cannot be built or used here")
    fused = kernels.attention_kernels(dtype, head_dim)
    assert fused is not None, "the kernels did not build: the message above says why"
    torch.manual_seed(0)
    n, scale = sum(lengths), head_dim ** -0.5
    bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(1, n, heads, head_dim).to(dtype).transpose(1, 2)
    k, v = (torch.randn(1, n, kv_heads, head_dim).to(dtype).transpose(1, 2) for _ in range(2))
    grad_out = torch.randn(1, heads, n, head_dim).to(dtype)
    ref_out, ref_lse, ref_grads = _float64_reference(q, k, v, grad_out, bounds.tolist(), scale)

    out, lse = fused.packed_attention_forward(q, k, v, bounds, scale)
    grads = fused.packed_attention_backward(grad_out, q, k, v, out, lse, bounds, scale)
    assert all(g.shape == t.shape and g.is_contiguous() for g, t in zip(grads, (q, k, v)))
    errors = _relative_errors([out, lse, *grads], [ref_out, ref_lse, *ref_grads])
    if dtype == torch.float32:
        assert max(errors) < 1e-5, errors
    else:
        monkeypatch.setattr(kernels, "attention_kernels", lambda dtype, head_dim: None)
        monkeypatch.setattr(attention, "_compiled_example_backward", lambda: attention._example_backward)
        out, lse = attention.packed_attention(q, k, v, bounds, scale)
        grads = attention.packed_attention_backward(grad_out, q, k, v, out, lse, bounds, scale)
        python_path = _relative_errors([out, lse, *grads], [ref_out, ref_lse, *ref_grads])
        assert all(e < 1e-2 and e <= 3 * p + 1e-6 for e, p in zip(errors, python_path)), (errors, python_path)


def test_a_failed_build_says_why_and_keeps_the_pytorch_path(monkeypatch, capsys):
    import torch.utils.cpp_extension

    def no_build(**kwargs):
        raise RuntimeError("Error building extension 'tunelab_kernels_avx512': c++: fatal error")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_build)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    kernels._say_once.cache_clear()
    assert kernels._load.__wrapped__() is False  # the uncached function: the session's real build stays
    said = capsys.readouterr().out
    assert "could not build tunelab's CPU kernels" in said and "fatal error" in said
    monkeypatch.setenv("TUNELAB_CPU_KERNELS", "0")
    assert kernels._load.__wrapped__() is False


def test_the_run_manifest_says_whether_the_kernels_can_run(monkeypatch):
    from tunelab.runs import environment_info

    monkeypatch.setenv("TUNELAB_CPU_KERNELS", "0")
    assert environment_info()["hardware"]["cpu_kernels"] == "TUNELAB_CPU_KERNELS=0"
