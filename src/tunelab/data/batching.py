"""Encoded examples -> micro batches: a seeded order per epoch, then packed or padded tensors.

Packed (default): the examples of a micro batch are concatenated into one row with position ids
restarting at 0 for each example. transformers turns those position ids into a block-diagonal
causal mask, so attention never crosses examples, and almost no compute is spent on padding.

Training rounds a batch's length up to one of 16 lengths per doubling (`bucket_length`): on a CPU,
oneDNN builds its matmul kernels for each new row count (2-35 ms each, ~25 a step), and a packed
batch's token count is new almost every step. With few lengths the kernels are reused after the
first steps, for at most 1/16 more tokens (~3% on average; bench/RESULTS.md, "Batch lengths in
buckets").
"""

import random

import torch

from tunelab.data.encode import IGNORE, Encoded


def epoch_order(lengths: list[int], micro_batch_size: int, seed: int, epoch: int,
                group_by_length: bool = False) -> list[list[int]]:
    """Index lists, one per micro batch, for one epoch. Deterministic in (seed, epoch), so a resumed
    run finds the same order and skips what it already consumed."""
    rng = random.Random(seed * 1000003 + epoch)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    if group_by_length:
        # sort within windows of 50 batches: similar lengths together, still shuffled globally
        window = micro_batch_size * 50
        idx = [i for w in range(0, len(idx), window)
               for i in sorted(idx[w:w + window], key=lambda i: lengths[i])]
        batches = [idx[i:i + micro_batch_size] for i in range(0, len(idx), micro_batch_size)]
        rng.shuffle(batches)
        return batches
    return [idx[i:i + micro_batch_size] for i in range(0, len(idx), micro_batch_size)]


def largest_batch_tokens(lengths: list[int], micro_batch_size: int, seed: int, epochs: int,
                         group_by_length: bool = False, packing: bool = True) -> int:
    """The most tokens a micro batch of the first `epochs` epochs holds: what a training step holds at most."""
    return max(batch_token_counts(lengths, micro_batch_size, seed, epochs, group_by_length, packing))


def batch_token_counts(lengths: list[int], micro_batch_size: int, seed: int, epochs: int,
                       group_by_length: bool = False, packing: bool = True) -> list[int]:
    """The tokens of each micro batch of the first `epochs` epochs, in the run's order, as `collate`
    makes them (bucketed; padded: rows x the longest)."""
    def tokens(batch: list[int]) -> int:
        sizes = [lengths[i] for i in batch]
        return bucket_length(sum(sizes)) if packing else len(sizes) * bucket_length(max(sizes))

    return [tokens(batch) for epoch in range(epochs)
            for batch in epoch_order(lengths, micro_batch_size, seed, epoch, group_by_length)]


def bucket_length(n: int) -> int:
    """`n` rounded up to a multiple of 2^(bits of n - 5): 16 lengths per doubling (1024, 1088, ...,
    1984, 2048, 2176, ...), never more than n/16 added; n <= 31 stays as it is."""
    step = 1 << max(n.bit_length() - 5, 0)
    return -(-n // step) * step


def collate_packed(items: list[Encoded], pad_id: int = 0, bucket: bool = False) -> dict[str, torch.Tensor]:
    """One row of the examples end to end; with `bucket`, a filler example of `pad_id` tokens (no
    targets, attending only to itself) makes the row's length a `bucket_length`."""
    ids, labels, pos = [], [], []
    for e in items:
        ids += e.input_ids
        # the first token of each example predicts nothing from the previous example
        labels += [IGNORE] + e.labels[1:]
        pos += range(len(e.input_ids))
    bounds = [0]
    for e in items:
        bounds.append(bounds[-1] + len(e.input_ids))
    filler = bucket_length(len(ids)) - len(ids) if bucket else 0
    if filler:
        ids += [pad_id] * filler
        labels += [IGNORE] * filler
        pos += range(filler)
        bounds.append(len(ids))
    # cu_seq_lens_q: where each example starts and ends, for packed (varlen) attention
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([pos]), "cu_seq_lens_q": torch.tensor(bounds, dtype=torch.int32)}


def collate_padded(items: list[Encoded], pad_id: int, bucket: bool = False) -> dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in items)
    width = bucket_length(width) if bucket else width
    ids = torch.full((len(items), width), pad_id)
    labels = torch.full((len(items), width), IGNORE)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, e in enumerate(items):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def collate(items: list[Encoded], packing: bool, pad_id: int) -> dict[str, torch.Tensor]:
    """A training or validation micro batch, its length in buckets."""
    return collate_packed(items, pad_id, bucket=True) if packing else collate_padded(items, pad_id, bucket=True)


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())
