"""stage: pretrain — raw text, packed, every token trained; the SFT loop (loop.py) does the training.

Continued pretraining loads model.ref. From scratch (pretrain.from_scratch) builds a randomly
initialised model from a named size or an architecture config.json, with a byte-level BPE
tokenizer trained on data.train and saved in the run (run/tokenizer/, and final/ at the end).
A plain-text corpus is one long document: it is cut into max_seq_len chunks first, and the
validation share is held out from those chunks (seeded), so one .txt file gives both sets.
"""

import json
import random
from pathlib import Path

from tunelab.config.schema import RunConfig
from tunelab.data.cache import cached_prepare
from tunelab.data.encode import encode_all
from tunelab.data.formats import load_examples
from tunelab.data.prepare import PreparedData, length_stats
from tunelab.errors import ConfigError, DataError

# Llama-architecture sizes for `pretrain.from_scratch: <name>` (vocab size comes from the tokenizer)
SIZES = {
    "llama-tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2),
    "llama-small": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=6,
                        num_key_value_heads=2),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, rope_theta=100000.0),
}


def load_text(cfg: RunConfig, path: str):
    examples, fmt = load_examples(path, "text" if cfg.data.format in ("auto", "text") else cfg.data.format,
                                  cfg.data.columns or None)
    return examples


def setup_pretrain(cfg: RunConfig, run_dir: Path, is_main: bool, progress: bool = True):
    """(model in fp32, tokenizer, PreparedData) for a pretraining run."""
    from tunelab.models.load import load_model

    train_ex = load_text(cfg, cfg.data.train)
    val_ex = load_text(cfg, cfg.data.validation) if cfg.data.validation else []
    if cfg.pretrain.from_scratch:
        tok_dir = Path(run_dir) / "tokenizer"
        if (tok_dir / "tokenizer.json").is_file():  # resumed run: the tokenizer it started with
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        else:
            from tunelab.training.stages.tokenizer import train_tokenizer

            tokenizer = train_tokenizer([e.text for e in train_ex], cfg.pretrain.vocab_size,
                                        tok_dir if is_main else Path(run_dir) / f".tokenizer-{id(cfg)}")
        model = new_model(cfg.pretrain.from_scratch, tokenizer, cfg.data.max_seq_len, cfg.seed)
    else:
        model, tokenizer = load_model(cfg.model.ref, dtype="fp32", device="cpu",
                                      trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.revision,
                                      quantization=cfg.base_quantization or "none",
                                      double_quant=cfg.model.double_quant)
    data = cached_prepare(cfg.data, tokenizer, cfg.seed, "pretrain",
                          lambda: prepare_text(cfg, train_ex, val_ex, tokenizer, progress))
    return model, tokenizer, data


def new_model(spec: str, tokenizer, max_seq_len: int, seed: int):
    """A randomly initialised causal LM from a named size or a config.json, sized to the tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if spec in SIZES:
        config = LlamaConfig(**SIZES[spec], **ids, max_position_embeddings=max(2048, max_seq_len),
                             tie_word_embeddings=True)
    else:
        path = Path(spec)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise ConfigError(f"pretrain.from_scratch={spec!r} is neither a named size ({', '.join(SIZES)}) nor "
                              "an architecture config.json; fix the name or the path")
        raw = json.loads(path.read_text())
        if "model_type" not in raw:
            raise ConfigError(f"{path}: no model_type; an architecture config.json names it (e.g. \"llama\")")
        raw.update(ids)
        raw["max_position_embeddings"] = max(raw.get("max_position_embeddings", 0), max_seq_len)
        config = AutoConfig.for_model(**raw)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def prepare_text(cfg: RunConfig, train_ex, val_ex, tokenizer, progress: bool) -> PreparedData:
    """Encode raw text into max_seq_len chunks (all tokens trained); hold out validation chunks."""
    d = cfg.data
    train, _, _ = encode_all(train_ex, tokenizer, d.max_seq_len, True, progress)
    if val_ex:
        val, _, _ = encode_all(val_ex, tokenizer, d.max_seq_len, True, progress)
    else:
        order = list(range(len(train)))
        random.Random(cfg.seed).shuffle(order)
        n_val = int(round(len(train) * d.val_fraction)) if len(train) >= 2 else 0
        held = set(order[:n_val])
        val = [e for i, e in enumerate(train) if i in held]
        train = [e for i, e in enumerate(train) if i not in held]
    if d.limit:
        train = train[: d.limit]
    if d.val_limit:
        val = val[: d.val_limit]
    if not train:
        raise DataError(f"{d.train}: no text long enough to train on (need at least 2 tokens)")
    lengths = [len(e.input_ids) for e in train]
    split = lambda items: {"examples": len(items), "sequences": len(items), "truncated": 0,  # noqa: E731
                           "dropped_no_target": 0, "eos_appended": 0,
                           "tokens": sum(len(e.input_ids) for e in items),
                           "target_tokens": sum(e.n_targets for e in items)}
    report = {"format": "text", "train_file": d.train, "validation_file": d.validation,
              "documents": len(train_ex), "train_examples": len(train), "val_examples": len(val),
              "max_seq_len": d.max_seq_len, "train": split(train), "val": split(val),
              "train_token_lengths": length_stats(lengths), "duplicates": 0, "duplicates_dropped": False,
              "duplicate_examples": [], "train_val_overlap": 0, "overlap_examples": []}
    return PreparedData(train, val, train_ex, val_ex, report)
