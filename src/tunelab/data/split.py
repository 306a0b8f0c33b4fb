"""Seeded train/validation split, exact duplicates, and train/validation overlap."""

import random

from tunelab.data.types import Example


def split_examples(examples: list[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out a seeded random share of the examples for validation.

    Args:
        examples: all examples, in file order.
        val_fraction: share to hold out; validation gets round(n * val_fraction) examples, at least 1
            when val_fraction > 0 and n >= 2, and at most n - 1 so training is never empty.
        seed: the same seed and examples always give the same split.

    Returns:
        (train, val), each in the original file order.
    """
    n = len(examples)
    if val_fraction <= 0 or n < 2:
        return list(examples), []
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    order = list(range(n))
    random.Random(seed).shuffle(order)  # a private generator: the global random state is left alone
    held_out = set(order[:n_val])
    train = [e for i, e in enumerate(examples) if i not in held_out]
    val = [e for i, e in enumerate(examples) if i in held_out]
    return train, val


def find_duplicates(examples: list[Example]) -> list[tuple[str, str]]:
    """(first occurrence's source, duplicate's source) for every exact repeat, by Example.key()."""
    first: dict[str, str] = {}
    pairs = []
    for e in examples:
        k = e.key()
        if k in first:
            pairs.append((first[k], e.source))
        else:
            first[k] = e.source
    return pairs


def drop_duplicates(examples: list[Example]) -> tuple[list[Example], int]:
    """The examples with exact repeats removed (the first occurrence kept), and how many were dropped."""
    seen: set[str] = set()
    kept = []
    for e in examples:
        k = e.key()
        if k not in seen:
            seen.add(k)
            kept.append(e)
    return kept, len(examples) - len(kept)


def find_overlap(train: list[Example], val: list[Example]) -> list[tuple[str, str]]:
    """(train source, validation source) for every validation example that also occurs in training."""
    seen: dict[str, str] = {}
    for e in train:
        seen.setdefault(e.key(), e.source)
    return [(seen[e.key()], e.source) for e in val if e.key() in seen]
