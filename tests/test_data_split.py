"""Seeded split, exact duplicates, train/validation overlap."""

import pytest

from tunelab.data.split import drop_duplicates, find_duplicates, find_overlap, split_examples
from tunelab.data.types import Example


def chat(q: str, a: str, source: str) -> Example:
    return Example(messages=[{"role": "user", "content": q}, {"role": "assistant", "content": a}], source=source)


def many(n: int) -> list[Example]:
    return [chat(f"q{i}", f"a{i}", f"d.jsonl:{i + 1}") for i in range(n)]


def sources(examples: list[Example]) -> list[str]:
    return [e.source for e in examples]


def test_split_is_deterministic_for_a_seed():
    data = many(50)
    first = split_examples(data, 0.2, seed=3)
    assert sources(first[1]) == sources(split_examples(many(50), 0.2, seed=3)[1])
    assert sources(first[1]) != sources(split_examples(data, 0.2, seed=4)[1])
    assert sources(first[1]) != sources(data[:10])  # shuffled, not the head of the file


def test_split_is_a_partition_in_file_order():
    data = many(50)
    train, val = split_examples(data, 0.2, seed=0)
    assert len(val) == 10 and len(train) == 40
    assert sorted(sources(train) + sources(val), key=lambda s: int(s.split(":")[1])) == sources(data)
    for part in (train, val):
        lines = [int(s.split(":")[1]) for s in sources(part)]
        assert lines == sorted(lines)


@pytest.mark.parametrize("n, fraction, n_val", [
    (10, 0.1, 1), (10, 0.26, 3), (100, 0.15, 15), (2, 0.01, 1), (20, 0.01, 1), (3, 0.9, 2),
    (1, 0.5, 0), (10, 0.0, 0), (0, 0.3, 0),
])
def test_split_sizes(n, fraction, n_val):
    train, val = split_examples(many(n), fraction, seed=1)
    assert (len(train), len(val)) == (n - n_val, n_val)


def test_split_does_not_touch_global_random_state():
    import random

    random.seed(7)
    expected = random.random()
    random.seed(7)
    split_examples(many(10), 0.3, seed=0)
    assert random.random() == expected


def test_find_duplicates_exact_only():
    data = [chat("q", "a", "d:1"), chat("q", "b", "d:2"), chat("q", "a", "d:3"),
            Example(text="t", source="d:4"), Example(text="t", source="d:5"), chat("q", "a", "d:6"),
            Example(messages=[{"role": "user", "content": "q"}, {"role": "user", "content": "a"}], source="d:7")]
    assert find_duplicates(data) == [("d:1", "d:3"), ("d:4", "d:5"), ("d:1", "d:6")]
    assert find_duplicates(many(5)) == []


def test_drop_duplicates_keeps_first():
    data = [chat("q", "a", "d:1"), chat("q", "a", "d:2"), chat("x", "y", "d:3"), chat("q", "a", "d:4")]
    kept, dropped = drop_duplicates(data)
    assert sources(kept) == ["d:1", "d:3"] and dropped == 2


def test_find_overlap():
    train = [chat("q1", "a", "t:1"), chat("q2", "a", "t:2"), chat("q2", "a", "t:3")]
    val = [chat("q2", "a", "v:1"), chat("q3", "a", "v:2"), chat("q1", "a", "v:3"), chat("q1", "b", "v:4")]
    assert find_overlap(train, val) == [("t:2", "v:1"), ("t:1", "v:3")]
    assert find_overlap(train, []) == []


def test_val_limit_keeps_the_first_validation_examples(sentiment_file, tokenizer, tmp_path):
    """data.val_limit caps every stage's validation set at its first N: of the seeded split, of the
    validation file, of pretraining's held-out chunks and of preference pairs; 0 is refused."""
    from dataclasses import replace

    from tunelab.config import load_config
    from tunelab.config.schema import DataConfig
    from tunelab.data.prepare import prepare_data
    from tunelab.errors import ConfigError
    from tunelab.training.stages.pretrain import prepare_text
    from tunelab.training.stages.trl_stages import _data

    split = DataConfig(train=str(sentiment_file), val_fraction=0.5, cache=False)
    given = replace(split, validation=str(sentiment_file))
    for cfg in (split, given):
        whole = prepare_data(cfg, tokenizer, seed=0)
        capped = prepare_data(replace(cfg, val_limit=3), tokenizer, seed=0)
        assert len(whole.val_examples) > 3
        assert sources(capped.val_examples) == sources(whole.val_examples[:3])
        assert len(capped.val) == 3 and capped.report["val_examples"] == 3
        assert sources(capped.train_examples) == sources(whole.train_examples)  # training is untouched

    text = load_config({"stage": "pretrain", "model": {"ref": "x"},
                        "data": {"train": str(sentiment_file), "val_fraction": 0.5, "val_limit": 2}})
    examples = [chat(f"some words {i}", "more", f"t:{i}") for i in range(8)]
    assert len(prepare_text(text, examples, [], tokenizer, False).val) == 2

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(f'{{"prompt": "q{i}", "chosen": "yes", "rejected": "no"}}\n' for i in range(10)))
    dpo = load_config({"stage": "dpo", "model": {"ref": "x"},
                       "data": {"train": str(pairs), "val_fraction": 0.5, "val_limit": 2}})
    train, val, report = _data(dpo)
    assert len(val) == 2 and report["val_examples"] == 2 and len(train) == 5

    with pytest.raises(ConfigError, match="data.val_limit=0 must be >= 1"):
        load_config({"model": {"ref": "x"}, "data": {"train": str(sentiment_file), "val_limit": 0}})
