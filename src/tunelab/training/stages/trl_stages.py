"""Stages dpo, orpo, kto, reward and grpo on TRL's trainers (ppo is ours: ppo.py), behind tunelab's config and run layout.

Our config maps onto TRL's argument lists here and nowhere else (users never see them). The run
directory is the SFT one: config.yaml, data_report.json, metrics.jsonl (a TrainerCallback writes
each log line), checkpoints/ (TRL's checkpoint-N folders: weights, optimizer, scheduler, RNG),
final/ (adapter or weights + tokenizer), loss.png, and manifest.json written last. Ctrl-C saves a
checkpoint; `--resume` continues the run from its newest one.
"""

import json
import math
import random
import time
from pathlib import Path

import torch

from tunelab.config import RunConfig, config_to_dict, load_config, save_config
from tunelab.errors import ConfigError, RunError
from tunelab.hardware import dtype_name, peak_rss_mb, resolve_dtype, set_threads, slow_dtype_warning
from tunelab.log import console, info
from tunelab.runs import (append_metrics, atomic_dir, atomic_write_json, environment_info, last_run, new_run_dir,
                          plot_losses, sha256_file, truncate_metrics, write_manifest)

# log keys renamed so loss.png and readers see the SFT names; the rest are kept as TRL logs them
RENAME = {"learning_rate": "lr", "eval_loss": "val_loss"}
SKIP = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos", "train_loss",
        "eval_runtime", "eval_samples_per_second", "eval_steps_per_second"}


def train_trl(cfg: RunConfig, name: str, resume, quiet: bool):
    """Run a TRL-backed stage; returns a TrainResult like the SFT loop."""
    from tunelab.training.loop import TrainResult

    run_dir, start_ckpt = _run_dir(cfg, name, resume)
    save_config(cfg, run_dir / "config.yaml")
    threads = set_threads(cfg.train.threads) if not torch.cuda.is_available() else None
    torch.manual_seed(cfg.seed)
    started = time.time()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    compute_dtype = resolve_dtype(cfg.model.dtype, dev)
    if warning := slow_dtype_warning(dev.type, compute_dtype):
        info(warning)

    train_rows, val_rows, report = _data(cfg)
    atomic_write_json(run_dir / "data_report.json", report)
    model, tokenizer = _model(cfg)
    info(f"stage {cfg.stage}: model {cfg.model.ref}, method {cfg.method}{' (DoRA)' if cfg.lora.use_dora else ''}, "
         f"compute {dtype_name(compute_dtype)}" + (f", {threads} threads" if threads else "")
         + f"; {len(train_rows)} train / {len(val_rows)} validation rows; run {run_dir}")
    trainer = _trainer(cfg, model, tokenizer, train_rows, val_rows, run_dir, compute_dtype, quiet)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # it prints every log dict; our callback logs instead

    val_before = None
    if start_ckpt is None and val_rows:
        val_before = trainer.evaluate().get("eval_loss")
    if start_ckpt is not None:
        step = json.loads((start_ckpt / "trainer_state.json").read_text())["global_step"]
        truncate_metrics(run_dir, step)
        info(f"resuming from {start_ckpt} (step {step})")
    t0 = time.time()
    try:
        out = trainer.train(resume_from_checkpoint=str(start_ckpt) if start_ckpt else None)
    except KeyboardInterrupt:
        trainer._save_checkpoint(trainer.model, trial=None)  # weights, optimizer, scheduler, RNG: resumable
        step = trainer.state.global_step
        info(f"\n[yellow]interrupted at step {step}[/]: saved a checkpoint in {run_dir / 'checkpoints'}; continue "
             f"with `tunelab train {run_dir / 'config.yaml'} --resume`")
        return TrainResult(run_dir, None, step, val_before, None, interrupted=True)
    train_seconds = time.time() - t0
    evals = [r for r in trainer.state.log_history if "eval_loss" in r]
    if evals and evals[-1].get("step") == trainer.state.global_step:
        after = evals[-1]  # the last step was just evaluated; do not pay for it twice
    else:
        after = trainer.evaluate() if val_rows else {}
    val_after = after.get("eval_loss")

    final_dir = run_dir / "final"
    with atomic_dir(final_dir) as tmp:
        _save_final(cfg, trainer, tokenizer, tmp)
    plot_losses(run_dir)
    steps = trainer.state.global_step
    rewards = [r["reward"] for r in trainer.state.log_history if "reward" in r]
    write_manifest(run_dir, {
        "run": run_dir.name, "status": "finished", "stage": cfg.stage, "method": cfg.method, "seed": cfg.seed,
        "model": cfg.model.ref, "steps": steps, "val_loss_before": val_before, "val_loss_after": val_after,
        "val_metrics_after": {k.removeprefix("eval_"): v for k, v in after.items()
                              if k.startswith("eval_") and k not in SKIP},
        "reward_first": rewards[0] if rewards else None, "reward_last": rewards[-1] if rewards else None,
        "train_loss": out.training_loss,
        "data": {"train": cfg.data.train, "train_sha256": sha256_file(cfg.data.train),
                 "validation": cfg.data.validation,
                 "validation_sha256": sha256_file(cfg.data.validation) if cfg.data.validation else None},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "train_seconds": round(train_seconds, 3),
        "peak_rss_mb": round(peak_rss_mb()), "processes": 1, "config": config_to_dict(cfg),
        **_environment()})
    if val_after is not None:
        info(f"validation loss ({cfg.stage}) after training: {val_after:.4f}"
             + (f" (before: {val_before:.4f})" if val_before is not None else ""))
    info(f"[green]done[/]: {final_dir} ({steps} steps in {train_seconds:.0f}s, peak RSS {peak_rss_mb():.0f} MB)")
    return TrainResult(run_dir, final_dir, steps, val_before, val_after)


# --- run directory and resume ------------------------------------------------------------

def _run_dir(cfg: RunConfig, name: str, resume, find_checkpoint=None) -> tuple[Path, Path | None]:
    """A new run directory, or the one to resume and its newest checkpoint (found by find_checkpoint)."""
    if not resume:
        return new_run_dir(cfg.output_dir, name), None
    run = Path(resume) if not isinstance(resume, bool) else last_run(cfg.output_dir, name)
    if run is None or not run.is_dir():
        raise RunError(f"nothing to resume: no run named {name}-* in {cfg.output_dir}/; start one without --resume")
    if (run / "manifest.json").exists():
        raise RunError(f"{run} already finished; to train longer start a new run from its final/ weights")
    found = (find_checkpoint or latest_checkpoint)(run)
    if found is None:
        raise RunError(f"{run} has no checkpoint yet (it stopped before the first save); start it again without --resume")
    old = load_config(run / "config.yaml")
    if old.stage != cfg.stage:
        raise RunError(f"{run} is a stage {old.stage} run; resume it with its own config ({run / 'config.yaml'})")
    return run, found


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = Path(run_dir) / "checkpoints"
    done = [p for p in root.glob("checkpoint-*") if (p / "trainer_state.json").is_file()] if root.is_dir() else []
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


# --- data --------------------------------------------------------------------------------

def _data(cfg: RunConfig) -> tuple[list[dict], list[dict], dict]:
    from tunelab.data.preference import load_preference_rows

    d = cfg.data
    rows, fmt = load_preference_rows(d.train, cfg.stage, d.format, d.system_prompt, d.columns or None)
    if d.validation:
        val, _ = load_preference_rows(d.validation, cfg.stage, d.format, d.system_prompt, d.columns or None)
        train = rows
    elif cfg.stage not in ("grpo", "ppo") and d.val_fraction > 0 and len(rows) >= 2:
        order = list(range(len(rows)))
        random.Random(cfg.seed).shuffle(order)
        n_val = max(1, int(round(len(rows) * d.val_fraction)))
        held = set(order[:n_val])
        train, val = [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]
    else:
        train, val = rows, []
    if d.limit:
        train = train[: d.limit]
    if d.val_limit:
        val = val[: d.val_limit]
    report = {"stage": cfg.stage, "format": fmt, "train_file": d.train, "validation_file": d.validation,
              "rows": len(rows), "train_examples": len(train), "val_examples": len(val)}
    return train, val, report


# --- model -------------------------------------------------------------------------------

def _model(cfg: RunConfig):
    from tunelab.models.load import load_model

    model, tok = load_model(cfg.model.ref, dtype="fp32", device="cpu", chat_template=cfg.model.chat_template,
                            trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.revision,
                            quantization=cfg.base_quantization or "none", double_quant=cfg.model.double_quant)
    if hasattr(model, "merge_and_unload"):  # a LoRA run as the starting point: its adapter becomes the base
        model = model.merge_and_unload()
    if cfg.base_quantization:
        from tunelab.training.lora import keep_4bit_base_trainable

        keep_4bit_base_trainable(model)  # TRL evaluates and generates between steps
    if cfg.stage == "reward":
        model = _to_reward_model(model, tok)
    model.config.use_cache = cfg.stage in ("grpo", "ppo")  # generation needs the cache; training does not
    return model, tok


def _to_reward_model(lm, tok):
    """The causal LM's body with a fresh scalar head (AutoModelForSequenceClassification, 1 label)."""
    from transformers import AutoModelForSequenceClassification

    config = lm.config
    config.num_labels, config.pad_token_id = 1, tok.pad_token_id
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    body = getattr(lm, lm.base_model_prefix)
    getattr(rm, rm.base_model_prefix).load_state_dict(body.state_dict())
    return rm


def _peft_config(cfg: RunConfig):
    if not cfg.uses_adapter:
        return None
    import peft

    lo = cfg.lora
    return peft.LoraConfig(r=lo.rank, lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=lo.target_modules,
                           use_dora=lo.use_dora, bias="none",
                           task_type="SEQ_CLS" if cfg.stage == "reward" else "CAUSAL_LM")


# --- trainer -----------------------------------------------------------------------------

def _common_args(cfg: RunConfig, run_dir: Path, compute_dtype, has_val: bool) -> dict:
    t = cfg.train
    warmup = t.warmup_steps if t.warmup_steps is not None else 0.05  # a float below 1 is a ratio
    eval_on = has_val and t.eval_every_n_steps > 0
    return dict(
        output_dir=str(run_dir / "checkpoints"), seed=cfg.seed, data_seed=cfg.seed,
        max_steps=t.max_steps or -1, num_train_epochs=t.epochs,
        per_device_train_batch_size=t.micro_batch_size, per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum_steps, learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler if t.lr_scheduler != "constant" else "constant_with_warmup",
        warmup_steps=warmup, weight_decay=t.weight_decay, adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2,
        max_grad_norm=t.max_grad_norm, logging_steps=t.log_every_n_steps,
        eval_strategy="steps" if eval_on else "no", eval_steps=t.eval_every_n_steps if eval_on else None,
        save_strategy="steps" if t.save_every_n_steps else "no", save_steps=t.save_every_n_steps or 500,
        save_total_limit=t.keep_checkpoints, bf16=compute_dtype == torch.bfloat16,
        fp16=compute_dtype == torch.float16, use_cpu=not torch.cuda.is_available(), report_to=[],
        disable_tqdm=True, gradient_checkpointing=bool(t.gradient_checkpointing), dataloader_num_workers=0,
        neftune_noise_alpha=t.neftune_alpha, save_only_model=False,
        **({"optim": "adamw_bnb_8bit"} if t.optimizer == "adamw_8bit" else {}))


def _trainer(cfg: RunConfig, model, tok, train_rows, val_rows, run_dir, compute_dtype, quiet):
    from datasets import Dataset

    st, pref, rl, d = cfg.stage, cfg.preference, cfg.rl, cfg.data
    args = _common_args(cfg, run_dir, compute_dtype, bool(val_rows))
    kwargs = dict(model=model, processing_class=tok, train_dataset=Dataset.from_list(train_rows),
                  eval_dataset=Dataset.from_list(val_rows) if val_rows else None,
                  callbacks=[RunCallback(run_dir, quiet)], peft_config=_peft_config(cfg))
    if st == "dpo":
        from trl import DPOConfig, DPOTrainer

        conf = DPOConfig(**args, beta=pref.beta, loss_type=[pref.loss_type], max_length=d.max_seq_len,
                         truncation_mode="keep_end")
        return DPOTrainer(args=conf, **kwargs)
    if st == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        conf = ORPOConfig(**args, beta=pref.beta, max_length=d.max_seq_len,
                          max_completion_length=d.max_seq_len - pref.max_prompt_len)
        return ORPOTrainer(args=conf, **kwargs)
    if st == "kto":
        from trl import KTOConfig, KTOTrainer

        conf = KTOConfig(**args, beta=pref.beta, max_length=d.max_seq_len)
        return KTOTrainer(args=conf, **kwargs)
    if st == "reward":
        from trl import RewardConfig, RewardTrainer

        args["neftune_noise_alpha"] = None  # noise on a scorer's inputs is not what NEFTune is for
        conf = RewardConfig(**args, max_length=d.max_seq_len)
        return RewardTrainer(args=conf, **kwargs)
    if st == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        # micro_batch_size counts prompts; each brings num_generations completions
        args["per_device_train_batch_size"] = cfg.train.micro_batch_size * rl.num_generations
        args["neftune_noise_alpha"] = None
        kwargs.pop("eval_dataset")
        conf = GRPOConfig(**args, num_generations=rl.num_generations, max_completion_length=rl.max_new_tokens,
                          temperature=rl.temperature, beta=rl.beta, log_completions=False)
        funcs, procs = _rewards(rl)
        return GRPOTrainer(args=conf, reward_funcs=funcs, reward_processing_classes=procs, **kwargs)
    raise ConfigError(f"stage={st!r} has no trainer here; use one of dpo, orpo, kto, reward, grpo")


def _rewards(rl) -> tuple[list, list]:
    """Reward functions and their tokenizers: a user function, a reward model, or both (summed)."""
    funcs, procs = [], []
    if rl.reward_function:
        funcs.append(plain_text_reward(load_reward_function(rl.reward_function)))
        procs.append(None)
    if rl.reward_model:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from tunelab.errors import ModelError

        folder = Path(rl.reward_model)
        folder = folder / "final" if (folder / "final").is_dir() else folder
        if not (folder / "config.json").is_file():
            raise ModelError(f"rl.reward_model={rl.reward_model!r}: no model there (expected a `stage: reward` run "
                             "directory or a folder with config.json); train one with examples/reward.yaml")
        funcs.append(AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32))
        procs.append(AutoTokenizer.from_pretrained(folder))
    return funcs, procs


def load_reward_function(spec: str):
    """"package.module:function" or "path/to/file.py:function" -> the function."""
    import importlib
    import importlib.util

    target, _, fn_name = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise FileNotFoundError(target)
            mod_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except (ImportError, FileNotFoundError) as e:
        raise ConfigError(f"rl.reward_function={spec!r}: cannot load {target!r} ({e}); give an importable module "
                          "or a .py path relative to the current directory") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"rl.reward_function={spec!r}: {target} has no function {fn_name!r}")
    return fn


def plain_text_reward(fn):
    """TRL passes chat-form prompts/completions; our reward functions get the text of each."""
    def text(x):
        return x[-1]["content"] if isinstance(x, list) else x

    def reward(prompts, completions, **columns):
        scores = fn(prompts=[text(p) for p in prompts], completions=[text(c) for c in completions], **columns)
        return [float(s) for s in scores]

    reward.__name__ = getattr(fn, "__name__", "reward")
    return reward


def _save_final(cfg: RunConfig, trainer, tok, folder: Path) -> None:
    model = trainer.model
    if cfg.stage == "reward" and hasattr(model, "merge_and_unload"):
        # a reward model is used as a whole (by grpo, or to score): store it merged
        model = model.merge_and_unload()
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    conf = folder / "adapter_config.json"
    if conf.is_file():  # the base is named by its tunelab reference, not a machine-local cache path
        data = json.loads(conf.read_text())
        data["base_model_name_or_path"] = cfg.model.ref
        conf.write_text(json.dumps(data, indent=2))


def _environment() -> dict:
    import importlib.metadata as md

    env = environment_info()
    env["versions"]["trl"] = md.version("trl")
    return env


# --- progress and metrics ----------------------------------------------------------------

def _callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class RunCallback(_callback_base()):
    """Writes each log line to metrics.jsonl (SFT key names) and drives a rich progress bar."""

    def __init__(self, run_dir: Path, quiet: bool):
        self.run_dir, self.quiet, self.progress, self.task = Path(run_dir), quiet, None, None

    def on_train_begin(self, args, state, control, **kw):
        from tunelab.training.loop import _progress

        self.progress = _progress(state.max_steps, state.global_step, disable=self.quiet)
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step,
                                           loss=float("nan"), tps=0.0)

    def on_log(self, args, state, control, logs=None, **kw):
        rec = {"step": state.global_step}
        for k, v in (logs or {}).items():
            if k in SKIP or not isinstance(v, (int, float)):
                continue
            rec[RENAME.get(k, k.replace("eval_", "val_", 1) if k.startswith("eval_") else k)] = v
        if set(rec) - {"step", "epoch"}:  # not the end-of-training summary (runtime only)
            append_metrics(self.run_dir, rec)
        if "val_loss" in rec and state.global_step and self.progress:
            self.progress.console.print(f"step {state.global_step}: validation loss {rec['val_loss']:.4f}")
        if self.progress and "loss" in rec and math.isfinite(rec["loss"]):
            self.progress.update(self.task, loss=rec["loss"])
        if (not self.quiet and not console.is_terminal and "loss" in rec
                and state.global_step % max(1, state.max_steps // 10) == 0):  # logs: a line every 10%
            console.print(f"step {state.global_step}/{state.max_steps}  loss {rec['loss']:.4f}")

    def on_step_end(self, args, state, control, **kw):
        if self.progress:
            self.progress.update(self.task, completed=state.global_step)

    def on_train_end(self, args, state, control, **kw):
        if self.progress:
            self.progress.stop()
