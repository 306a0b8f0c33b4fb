"""Build a RunConfig from YAML, a dict and `key=value` overrides; validate it in one pass.

Unknown keys, wrong types and cross-field problems are all collected and raised together in
one ConfigError, each with the key, the bad value and the fix.
"""

import copy
import dataclasses
import difflib
import importlib.util
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from tunelab.config.schema import RunConfig
from tunelab.errors import ConfigError

METHODS = ("full", "lora", "qlora")
QUANTIZATIONS = ("nf4", "fp4", "int8")
DTYPES = ("auto", "bf16", "fp16", "fp32")
SCHEDULERS = ("cosine", "linear", "constant")
STAGES = ("sft", "pretrain", "dpo", "orpo", "kto", "reward", "grpo", "ppo")
DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust")
OPTIMIZERS = ("adamw", "adamw_8bit")
WEIGHT_DTYPES = ("fp32", "bf16")


def load_config(source: "str | Path | dict | RunConfig | None" = None,
                overrides: "list[str] | dict | None" = None) -> RunConfig:
    """Resolve a config from a YAML path, a dict, or a RunConfig, plus overrides.

    Args:
        source: path to a YAML file, a (nested) dict, a RunConfig, or None for all defaults.
        overrides: ["train.max_steps=50", "lora.rank=8"] or {"train.max_steps": 50}.

    Returns:
        A validated RunConfig.

    Raises:
        ConfigError: listing every problem found.
    """
    if isinstance(source, RunConfig):
        raw = config_to_dict(source)
    elif isinstance(source, dict):
        raw = copy.deepcopy(source)
    elif source is None:
        raw = {}
    else:
        raw = read_yaml(source)
    problems: list[str] = []
    for key, value in _parse_overrides(overrides, problems):
        _set_dotted(raw, key, value)
    cfg = _build(RunConfig, raw, "", problems)
    if isinstance(source, (str, Path)):
        _resolve_data_paths(cfg, Path(source).parent)
    if not problems:
        problems += validate(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def read_yaml(path: "str | Path") -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path}: no such file; check the path")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', e)}); fix the syntax") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, data:, ...)")
    return raw


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: "str | Path") -> None:
    """Write the fully resolved config (every default filled in) as YAML."""
    from tunelab.runs import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def validate(cfg: RunConfig) -> list[str]:
    """Cross-field checks. Returns the problems, each with its fix (empty list = valid)."""
    from tunelab.data.formats import FORMATS

    p = []
    t, d, lo, m = cfg.train, cfg.data, cfg.lora, cfg.model
    _one_of(p, "method", cfg.method, METHODS)
    _one_of(p, "model.dtype", m.dtype, DTYPES)
    if m.quantization is not None:
        _one_of(p, "model.quantization", m.quantization, QUANTIZATIONS)
        if cfg.method == "full":
            p.append(f"model.quantization={m.quantization} with method=full: quantized weights cannot be "
                     "trained; use method=qlora (adapters on a quantized base) or drop model.quantization")
    _one_of(p, "train.lr_scheduler", t.lr_scheduler, SCHEDULERS)
    _one_of(p, "train.optimizer", t.optimizer, OPTIMIZERS)
    if t.optimizer == "adamw_8bit" and importlib.util.find_spec("bitsandbytes") is None:
        p.append("train.optimizer=adamw_8bit needs the bitsandbytes package, which is not installed: "
                 "pip install bitsandbytes (or use train.optimizer=adamw)")
    _one_of(p, "train.weight_dtype", t.weight_dtype, WEIGHT_DTYPES)
    if t.weight_dtype == "bf16":
        if cfg.method != "full":
            p.append(f"train.weight_dtype=bf16 with method={cfg.method}: it is for full fine-tuning (adapters are "
                     "small and train in fp32); drop train.weight_dtype")
        if t.optimizer != "adamw":
            p.append(f"train.weight_dtype=bf16 with train.optimizer={t.optimizer}: bf16 weights need tunelab's "
                     "AdamW, which rounds each update stochastically; use train.optimizer=adamw")
        if cfg.stage not in ("sft", "pretrain"):
            p.append(f"train.weight_dtype=bf16 with stage={cfg.stage}: only the sft and pretrain stages train bf16 "
                     "weights (the others keep fp32 master weights); use train.weight_dtype=fp32")
    if t.optimizer_in_backward:
        if t.max_grad_norm > 0:
            p.append(f"train.optimizer_in_backward=true with train.max_grad_norm={t.max_grad_norm}: each weight is "
                     "stepped before the next gradient exists, so there is no global norm to clip by; set "
                     "train.max_grad_norm=0 (or turn train.optimizer_in_backward off)")
        if t.grad_accum_steps > 1:
            p.append(f"train.optimizer_in_backward=true with train.grad_accum_steps={t.grad_accum_steps}: every "
                     "backward pass steps the weights, so gradients cannot accumulate; set train.grad_accum_steps=1 "
                     "and raise train.micro_batch_size instead")
        if cfg.stage not in ("sft", "pretrain"):
            p.append(f"train.optimizer_in_backward=true with stage={cfg.stage}: only the sft and pretrain stages "
                     "step inside backward; drop train.optimizer_in_backward")
    _one_of(p, "stage", cfg.stage, STAGES)
    if cfg.stage in ("sft", "pretrain"):
        _one_of(p, "data.format", d.format, ("auto", *FORMATS))
    p += _validate_stage(cfg)
    if not m.ref:
        p.append("model.ref is empty; set it to an alias such as smollm2-135m-instruct, a folder or a .gguf file")
    if not d.train:
        p.append("data.train is empty; set it to your training file, e.g. data.train=my_data.jsonl")
    if not 0 <= d.val_fraction < 1:
        p.append(f"data.val_fraction={d.val_fraction} must be in [0, 1); e.g. 0.1")
    if d.max_seq_len < 16:
        p.append(f"data.max_seq_len={d.max_seq_len} is too small; use at least 16 (typical: 512-4096)")
    if d.limit is not None and d.limit < 1:
        p.append(f"data.limit={d.limit} must be >= 1 or null")
    if d.val_limit is not None and d.val_limit < 1:
        p.append(f"data.val_limit={d.val_limit} must be >= 1 or null")
    _positive(p, "lora.rank", lo.rank)
    _positive(p, "lora.alpha", lo.alpha)
    if not 0 <= lo.dropout < 1:
        p.append(f"lora.dropout={lo.dropout} must be in [0, 1); e.g. 0.05")
    _positive(p, "train.micro_batch_size", t.micro_batch_size)
    _positive(p, "train.grad_accum_steps", t.grad_accum_steps)
    _positive(p, "train.learning_rate", t.learning_rate)
    _positive(p, "train.epochs", t.epochs)
    if t.max_steps is not None:
        _positive(p, "train.max_steps", t.max_steps)
    if t.warmup_steps is not None and t.warmup_steps < 0:
        p.append(f"train.warmup_steps={t.warmup_steps} must be >= 0 or null (5% of the steps)")
    for key in ("eval_every_n_steps", "save_every_n_steps", "max_grad_norm", "weight_decay"):
        if getattr(t, key) < 0:
            p.append(f"train.{key}={getattr(t, key)} must be >= 0")
    _positive(p, "train.log_every_n_steps", t.log_every_n_steps)
    _positive(p, "train.keep_checkpoints", t.keep_checkpoints)
    if cfg.eval.every_n_steps < 0 or (cfg.eval.limit is not None and cfg.eval.limit < 1):
        p.append("eval.every_n_steps must be >= 0 and eval.limit >= 1 or null")
    from tunelab.evaluation.metrics import METRICS

    for name in cfg.eval.metrics:
        _one_of(p, "eval.metrics", name, METRICS)
    if t.threads is not None:
        _positive(p, "train.threads", t.threads)
    if cfg.method == "full" and t.learning_rate > 1e-3 and not cfg.pretrain.from_scratch:  # random init: no knowledge to destroy
        p.append(f"train.learning_rate={t.learning_rate} is far too high for method=full and would "
                 "destroy the model; use 1e-5..5e-5")
    return p


def _validate_stage(cfg: RunConfig) -> list[str]:
    """Checks of the stage-specific sections (pretrain, preference, rl) and NEFTune/DoRA."""
    from tunelab.data.preference import PREFERENCE_FORMATS

    p, st, pre, pref, rl = [], cfg.stage, cfg.pretrain, cfg.preference, cfg.rl
    if cfg.train.neftune_alpha is not None and cfg.train.neftune_alpha <= 0:
        p.append(f"train.neftune_alpha={cfg.train.neftune_alpha} must be > 0 (typical: 5) or null (off)")
    if pre.from_scratch is not None:
        if st != "pretrain":
            p.append(f"pretrain.from_scratch is set but stage={st!r}; set stage: pretrain or remove it")
        if cfg.method != "full":
            p.append("pretrain.from_scratch trains a new model: set method: full (LoRA needs pretrained weights)")
    if st == "reward" and cfg.base_quantization:
        p.append("stage reward builds a new scalar head on the model's full-precision body: use method: lora "
                 "or full (not qlora or model.quantization)")
    if pre.vocab_size < 300:
        p.append(f"pretrain.vocab_size={pre.vocab_size} is too small; use at least 300 (256 bytes + merges)")
    if st == "pretrain" and cfg.data.format not in ("auto", "text"):
        p.append(f"data.format={cfg.data.format!r}: stage pretrain reads raw text; use text (or auto)")
    if st in ("dpo", "orpo", "kto", "reward"):
        _one_of(p, "data.format", cfg.data.format, ("auto", *PREFERENCE_FORMATS))
        _positive(p, "preference.beta", pref.beta)
        _one_of(p, "preference.loss_type", pref.loss_type, DPO_LOSSES)
        _positive(p, "preference.max_prompt_len", pref.max_prompt_len)
        if st == "orpo" and pref.max_prompt_len >= cfg.data.max_seq_len:
            p.append(f"preference.max_prompt_len={pref.max_prompt_len} must be below data.max_seq_len="
                     f"{cfg.data.max_seq_len} (room is needed for the answers)")
    if st in ("grpo", "ppo"):
        _one_of(p, "data.format", cfg.data.format, ("auto", "prompt"))
        if not rl.reward_model and not rl.reward_function:
            p.append(f"stage {st} needs a reward: set rl.reward_model (a `stage: reward` run) or "
                     "rl.reward_function (\"module:function\" or \"file.py:function\")")
        if rl.reward_function and ":" not in rl.reward_function:
            p.append(f"rl.reward_function={rl.reward_function!r} must look like module:function or file.py:function")
        if st == "grpo" and rl.num_generations < 2:
            p.append(f"rl.num_generations={rl.num_generations} must be >= 2 (completions are compared within a group)")
        _positive(p, "rl.max_new_tokens", rl.max_new_tokens)
        if rl.max_new_tokens >= cfg.data.max_seq_len:
            p.append(f"rl.max_new_tokens={rl.max_new_tokens} leaves no room for the prompt in data.max_seq_len="
                     f"{cfg.data.max_seq_len}; lower it or raise data.max_seq_len")
        _positive(p, "rl.temperature", rl.temperature)
        if rl.beta < 0:
            p.append(f"rl.beta={rl.beta} must be >= 0")
    if st == "ppo":
        _positive(p, "rl.ppo_epochs", rl.ppo_epochs)
    return p


def _resolve_data_paths(cfg: RunConfig, config_dir: Path) -> None:
    """A relative data path is taken from the current directory, else from the config's folder."""
    for key in ("train", "validation"):
        value = getattr(cfg.data, key)
        if value and not Path(value).is_absolute() and not Path(value).exists():
            beside = config_dir / value
            if beside.exists():
                setattr(cfg.data, key, str(beside))
    e = cfg.eval.data
    if e and not Path(e).is_absolute() and not Path(e).exists() and (config_dir / e).exists():
        cfg.eval.data = str(config_dir / e)
    rl = cfg.rl  # a reward model folder or reward .py file named in the config: also beside the config
    if rl.reward_model and not Path(rl.reward_model).exists() and (config_dir / rl.reward_model).exists():
        rl.reward_model = str(config_dir / rl.reward_model)
    target, sep, fn = (rl.reward_function or "").rpartition(":")
    if sep and target.endswith(".py") and not Path(target).exists() and (config_dir / target).is_file():
        rl.reward_function = f"{config_dir / target}:{fn}"


# --- building dataclasses from dicts -------------------------------------------------------

def _build(cls, raw: Any, prefix: str, problems: list[str]):
    if not isinstance(raw, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
        return cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known keys: {', '.join(fields)}"
            problems.append(f"unknown key {prefix}{key}{hint}")
            continue
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value if value is not None else {}, f"{prefix}{key}.", problems)
        else:
            value = _coerce(value, hint)
            if not _type_ok(value, hint):
                problems.append(f"{prefix}{key}={value!r} should be {_type_name(hint)}")
                continue
            kwargs[key] = value
    return cls(**kwargs)


def _coerce(value, hint):
    """Accept YAML's natural spellings: 2e-4 read as a string, ints where floats are wanted."""
    if isinstance(value, str) and _allows(hint, float):
        try:
            return float(value)
        except ValueError:
            return value
    if isinstance(value, int) and not isinstance(value, bool) and _allows(hint, float) and not _allows(hint, int):
        return float(value)
    return value


def _allows(hint, typ) -> bool:
    return hint is typ or typ in typing.get_args(hint)


def _type_ok(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if hint is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        k, v = typing.get_args(hint)
        return isinstance(value, dict) and all(_type_ok(a, k) and _type_ok(b, v) for a, b in value.items())
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(hint, str(hint))


# --- overrides -----------------------------------------------------------------------------

def _parse_overrides(overrides, problems) -> list[tuple[str, Any]]:
    if not overrides:
        return []
    if isinstance(overrides, dict):
        return list(overrides.items())
    out = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"override {item!r} must look like key=value, e.g. train.max_steps=50")
            continue
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        out.append((key.strip(), value))
    return out


def _set_dotted(raw: dict, key: str, value) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def _one_of(problems, key, value, allowed) -> None:
    if value not in allowed:
        close = difflib.get_close_matches(str(value), allowed, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        problems.append(f"{key}={value!r} is not one of {', '.join(allowed)}; {hint}".rstrip("; ").rstrip())


def _positive(problems, key, value) -> None:
    if value <= 0:
        problems.append(f"{key}={value} must be > 0")
