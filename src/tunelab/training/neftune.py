"""NEFTune (Jain et al. 2023): noisy input embeddings during training only.

A forward hook on the input embedding layer adds Uniform(-1, 1) * alpha / sqrt(L * d) noise to
its output, L being the sequence length of the batch (the packed row's length when packing) and
d the hidden size. The hook checks `module.training`, so evaluation, validation loss and
generation (all under model.eval()) see the exact embeddings.
"""

import math

import torch


def neftune_hook(alpha: float):
    def hook(module, inputs, output):
        if not module.training:
            return output
        length, dim = output.shape[-2], output.shape[-1]
        scale = alpha / math.sqrt(length * dim)
        return output + torch.empty_like(output).uniform_(-scale, scale)

    return hook


def enable_neftune(model, alpha: float):
    """Add the noise hook to `model`'s input embeddings; returns the handle (.remove() undoes it)."""
    return model.get_input_embeddings().register_forward_hook(neftune_hook(alpha))
