"""Seeded train/validation split, exact duplicates, and train/validation overlap."""

import random

from tunelab.data.types import Example


def split_examples(examples: list[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out round(n * val_fraction) examples (at least 1), chosen by a seeded shuffle."""
    n = len(examples)
    if val_fraction <= 0 or n < 2:
        return list(examples), []
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    val_idx = set(idx[:n_val])
    train = [e for i, e in enumerate(examples) if i not in val_idx]
    val = [e for i, e in enumerate(examples) if i in val_idx]
    return train, val


def find_duplicates(examples: list[Example]) -> list[tuple[str, str]]:
    """(first occurrence, duplicate) source pairs of exactly equal examples."""
    first: dict[str, str] = {}
    pairs = []
    for e in examples:
        k = e.key()
        if k in first:
            pairs.append((first[k], e.source))
        else:
            first[k] = e.source
    return pairs


def find_overlap(train: list[Example], val: list[Example]) -> list[tuple[str, str]]:
    """(train source, validation source) pairs of validation examples that also occur in training."""
    seen = {}
    for e in train:
        seen.setdefault(e.key(), e.source)
    return [(seen[e.key()], e.source) for e in val if e.key() in seen]
