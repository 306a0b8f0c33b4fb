"""Data files -> encoded train/validation sets and a report of what happened to them.

read -> convert to Examples (file:line errors) -> split (seeded) or read the validation file ->
report duplicates and train/validation overlap -> encode with the chat template and loss mask.
"""

from dataclasses import asdict, dataclass, field

import numpy as np

from tunelab.config.schema import DataConfig
from tunelab.data.encode import Encoded, encode_all
from tunelab.data.formats import load_examples
from tunelab.data.split import find_duplicates, find_overlap, split_examples
from tunelab.data.types import Example


@dataclass
class PreparedData:
    train: list[Encoded]
    val: list[Encoded]
    train_examples: list[Example]
    val_examples: list[Example]
    report: dict = field(default_factory=dict)


def length_stats(lengths: list[int]) -> dict:
    if not lengths:
        return {}
    a = np.asarray(lengths)
    return {"min": int(a.min()), "p50": int(np.percentile(a, 50)), "p90": int(np.percentile(a, 90)),
            "p99": int(np.percentile(a, 99)), "max": int(a.max()), "mean": round(float(a.mean()), 1)}


def prepare_data(cfg: DataConfig, tokenizer, seed: int, progress: bool = True) -> PreparedData:
    """Load, split, check and encode the data a config names; from the tokenized cache when it
    holds these inputs (`data.cache`, see data/cache.py). report["tokenized_cache"] says which."""
    from tunelab.data.cache import cached_prepare

    return cached_prepare(cfg, tokenizer, seed, "sft", lambda: _prepare(cfg, tokenizer, seed, progress))


def _prepare(cfg: DataConfig, tokenizer, seed: int, progress: bool) -> PreparedData:
    examples, fmt = load_examples(cfg.train, cfg.format, cfg.columns or None, cfg.system_prompt)
    if cfg.validation:
        train_ex = examples
        val_ex, _ = load_examples(cfg.validation, cfg.format if cfg.format != "auto" else fmt,
                                  cfg.columns or None, cfg.system_prompt)
    elif cfg.val_fraction > 0 and len(examples) >= 2:
        train_ex, val_ex = split_examples(examples, cfg.val_fraction, seed)
    else:
        train_ex, val_ex = examples, []
    if cfg.val_limit:
        val_ex = val_ex[: cfg.val_limit]
    duplicates = find_duplicates(train_ex)
    if cfg.drop_duplicates and duplicates:
        dup_sources = {d for _, d in duplicates}
        train_ex = [e for e in train_ex if e.source not in dup_sources]
    overlap = find_overlap(train_ex, val_ex)
    if cfg.limit:
        train_ex = train_ex[: cfg.limit]

    train, train_stats, train_lengths = encode_all(train_ex, tokenizer, cfg.max_seq_len, cfg.train_on_prompt, progress)
    val, val_stats, _ = encode_all(val_ex, tokenizer, cfg.max_seq_len, cfg.train_on_prompt, progress)
    report = {
        "format": fmt,
        "train_file": cfg.train,
        "validation_file": cfg.validation,
        "rows": len(examples),
        "train_examples": len(train_ex),
        "val_examples": len(val_ex),
        "max_seq_len": cfg.max_seq_len,
        "train": asdict(train_stats),
        "val": asdict(val_stats),
        "train_token_lengths": length_stats(train_lengths),
        "duplicates": len(duplicates),
        "duplicates_dropped": bool(cfg.drop_duplicates and duplicates),
        "duplicate_examples": [list(d) for d in duplicates[:10]],
        "train_val_overlap": len(overlap),
        "overlap_examples": [list(o) for o in overlap[:10]],
    }
    return PreparedData(train, val, train_ex, val_ex, report)


def report_warnings(report: dict) -> list[str]:
    """Plain-language warnings a user should read before trusting the run."""
    w = []
    tr = report["train"]
    if tr["truncated"]:
        w.append(f"{tr['truncated']} of {tr['examples']} training examples are longer than max_seq_len="
                 f"{report['max_seq_len']} and were cut (raise data.max_seq_len to keep them whole)")
    if tr["dropped_no_target"]:
        w.append(f"{tr['dropped_no_target']} training examples had no answer tokens left after cutting and "
                 "were dropped")
    if tr["eos_appended"]:
        w.append(f"the chat template does not end answers with the EOS token; it was appended to "
                 f"{tr['eos_appended']} examples so the model learns to stop")
    if report["duplicates"]:
        what = "dropped" if report["duplicates_dropped"] else "kept (data.drop_duplicates=true drops them)"
        w.append(f"{report['duplicates']} exact duplicate training examples, {what}; "
                 f"e.g. {report['duplicate_examples'][0][1]} repeats {report['duplicate_examples'][0][0]}")
    if report["train_val_overlap"]:
        w.append(f"{report['train_val_overlap']} validation examples also occur in the training data, so "
                 f"validation loss is optimistic; e.g. {report['overlap_examples'][0][1]}")
    return w
