"""What a config's own data brings to a training step, for `tunelab plan CONFIG` (where data.train
is a local file; `--data` insists, `--no-data` skips it).

Without it the plan takes the worst case: every row max_seq_len tokens long, all of them answers.
Real instruction data is mostly far shorter (the alpaca demo: ~190 tokens a row against 512), so
the worst case's time can be 2-3x the run's. Here the data is read, split and encoded as `tunelab
train` does (through the tokenized cache, which the run then reuses) and batched in the run's own
order, so the plan gets the tokens of a real micro batch: the mean for the time, the largest for
the memory.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from tunelab.data.batching import batch_token_counts
from tunelab.errors import ConfigError


@dataclass
class DataTokens:
    examples: int
    mean_batch_tokens: float   # a micro batch's tokens on average (as collate makes them: bucketed)
    largest_batch_tokens: int  # the most a micro batch of the run holds: what memory must take
    answer_fraction: float     # share of the tokens that are trained answers (the head runs on them)
    attention_len: float       # sum(L^2) / sum(L) over the examples: the causal attention's mean span, x2
    steps: int                 # the run's optimizer steps (train.max_steps, else its epochs)
    # (rows, max_seq_len) -> the largest micro batch with that many rows of at most that length, over
    # the same steps and effective batch: what the advice's smaller micro batches and shorter rows hold
    largest_for: "Callable[[int, int], int]" = field(repr=False, compare=False)


def data_tokens(cfg, s, progress: bool = False) -> DataTokens:
    """Encode the config's training data (sft stage) and measure what its micro batches hold, at the
    plan's max_seq_len, micro batch and accumulation (the config's, or what the plan overrides).
    `progress`: a bar while a large dataset is encoded (on stderr; a second plan or run reads the cache)."""
    from dataclasses import replace

    from tunelab.data.prepare import prepare_data
    from tunelab.models.load import load_tokenizer, local_folder, run_model_dir
    from tunelab.models.resolve import resolve_model

    if cfg.stage != "sft":
        raise ConfigError(f"plan with data: reads the sft stage's data; this config's stage is {cfg.stage!r}. "
                          "Plan it with --no-data (data=False): the worst case")
    source = resolve_model(cfg.model.ref)
    folder = run_model_dir(source.path) if source.kind == "run" else local_folder(source, cfg.model.revision)
    tokenizer = load_tokenizer(folder, cfg.model.chat_template, cfg.model.trust_remote_code)
    train = prepare_data(replace(cfg.data, max_seq_len=s.max_seq_len), tokenizer, cfg.seed, progress=progress).train
    if not train:
        raise ConfigError(f"plan with data: no training example of {cfg.data.train} keeps an answer token within "
                          f"max_seq_len={s.max_seq_len}; raise max_seq_len")
    lengths = [len(e.input_ids) for e in train]
    t = cfg.train
    batches_per_epoch = math.ceil(len(train) / s.micro_batch_size)
    steps = t.max_steps or max(1, math.ceil(t.epochs * math.ceil(batches_per_epoch / s.grad_accum_steps)))
    rows_trained = steps * s.grad_accum_steps * s.micro_batch_size  # the same for any micro batch size

    def counts_for(rows: int, max_seq_len: int) -> list[int]:
        """The run's micro batches of `rows` rows, over the epochs its steps reach, with rows cut at
        `max_seq_len` (roughly: a cut example may also lose its answer and drop out)."""
        epochs = math.ceil(rows_trained / rows / math.ceil(len(lengths) / rows))
        cut = [min(n, max_seq_len) for n in lengths]
        return batch_token_counts(cut, rows, cfg.seed, epochs, t.group_by_length, t.packing)

    counts = counts_for(s.micro_batch_size, s.max_seq_len)
    answers = sum(e.n_targets for e in train)
    return DataTokens(len(train), sum(counts) / len(counts), max(counts), answers / max(1, sum(lengths)),
                      sum(n * n for n in lengths) / max(1, sum(lengths)), steps,
                      lambda rows, max_seq_len: max(counts_for(rows, max_seq_len)))
