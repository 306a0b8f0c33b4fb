"""stage ppo: RLHF with PPO against a reward model or a reward function, read top to bottom.

TRL 1.16 no longer ships a PPO trainer, so this is ours: the algorithm of TRL's former PPOTrainer
(Ouyang et al. 2022; Huang et al., "The N+ implementation details of RLHF with PPO", 2024).

One step = one rollout and its updates:
  1. sample one answer per prompt from the policy (micro_batch_size * grad_accum_steps prompts);
  2. score each answer (rl.reward_function and/or rl.reward_model, summed);
  3. per-token reward: -beta * (log pi - log pi_ref) on every token, plus the score on the last one;
  4. advantages by GAE (gamma = 1, lambda = 0.95) from a value head on the policy's last hidden
     state, whitened over the rollout;
  5. rl.ppo_epochs optimizer updates over the rollout, each accumulated over micro batches:
     clipped policy loss (epsilon 0.2) + 0.1 * clipped value loss.
The reference policy is the starting model: the base with adapters switched off (lora, qlora), or a
frozen copy (full; only when beta > 0). The value head (hidden -> 1) trains with the policy, is
checkpointed with it and saved in final/value_head.safetensors.

Same run directory, metrics.jsonl, checkpoints (checkpoints/step-N), resume and manifest as the other
stages. metrics.jsonl logs reward (mean score), kl, policy_loss, value_loss and loss per step.
"""

import copy
import math
import random
import signal
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tunelab.config import RunConfig, config_to_dict, save_config
from tunelab.errors import RunError
from tunelab.hardware import dtype_name, peak_rss_mb, resolve_dtype, set_threads, slow_dtype_warning
from tunelab.log import info
from tunelab.runs import (append_metrics, atomic_dir, atomic_write_json, plot_losses, sha256_file, truncate_metrics,
                          write_manifest)
from tunelab.training import checkpoint as ckpt
from tunelab.training.optim import build_optimizer, build_scheduler

CLIP_EPS, VF_CLIP, VF_COEF, GAMMA, LAM = 0.2, 0.2, 0.1, 1.0, 0.95


def train_ppo(cfg: RunConfig, name: str, resume, quiet: bool):
    from tunelab.training.loop import TrainResult, _progress
    from tunelab.training.stages import trl_stages as ts

    run_dir, start = ts._run_dir(cfg, name, resume, ckpt.latest_checkpoint)
    save_config(cfg, run_dir / "config.yaml")
    threads = set_threads(cfg.train.threads) if not torch.cuda.is_available() else None
    torch.manual_seed(cfg.seed)
    started = time.time()
    compute_dtype = resolve_dtype(cfg.model.dtype, torch.device("cpu"))
    if compute_dtype == torch.float16:  # its updates have no loss scaling (training/loss_scaling.py)
        raise RunError("stage ppo runs in bf16 or fp32, not fp16: set model.dtype to auto, bf16 or fp32")
    if warning := slow_dtype_warning("cpu", compute_dtype):
        info(warning)
    prompts, _, report = ts._data(cfg)
    atomic_write_json(run_dir / "data_report.json", report)
    policy, tok = ts._model(cfg)
    if cfg.uses_adapter:
        from tunelab.training.lora import apply_lora

        policy = apply_lora(policy, cfg.lora)
    ref = copy.deepcopy(policy).eval().requires_grad_(False) if not cfg.uses_adapter and cfg.rl.beta > 0 else None
    policy.eval()  # no dropout anywhere: the update's log-probs must match the rollout's (ratio 1 at first)
    value_head = torch.nn.Linear(policy.config.hidden_size, 1)
    torch.nn.init.normal_(value_head.weight, std=1 / math.sqrt(policy.config.hidden_size + 1))
    torch.nn.init.zeros_(value_head.bias)
    score = reward_scorer(cfg.rl)

    t = cfg.train
    per_rollout = t.micro_batch_size * t.grad_accum_steps
    steps = t.max_steps or t.epochs * math.ceil(len(prompts) / per_rollout)
    # the same AdamW (or adamw_8bit) and schedule as SFT, over the policy's trainable weights and the value head
    optimizer = build_optimizer(torch.nn.ModuleList([policy, value_head]), t)
    scheduler = build_scheduler(optimizer, t, steps * cfg.rl.ppo_epochs)
    step = 0
    if start is not None:
        ckpt.load_weights(start, policy, cfg.method)
        step = ckpt.load_training_state(start, optimizer, scheduler)["step"]
        value_head.load_state_dict(ckpt.load_extra(start)["value_head"])
        truncate_metrics(run_dir, step)
        info(f"resuming from {start} (step {step})")
    autocast = torch.autocast("cpu", dtype=compute_dtype, enabled=compute_dtype != torch.float32)
    info(f"stage ppo: model {cfg.model.ref}, method {cfg.method}, compute {dtype_name(compute_dtype)}"
         + (f", {threads} threads" if threads else "") + f"; {len(prompts)} prompts, {per_rollout} per rollout, "
         f"{steps} rollouts x {cfg.rl.ppo_epochs} updates; run {run_dir}")

    progress = _progress(steps, step, disable=quiet)
    task = progress.add_task("train", total=steps, completed=step, loss=float("nan"), tps=0.0)
    first_reward = last_reward = None
    t0 = time.time()
    with progress, StopRequest() as stop:
        while step < steps:
            batch = rollout_prompts(prompts, step, per_rollout, cfg.seed)
            tic = time.time()
            roll = rollout(policy, ref, value_head, tok, batch, score, cfg, autocast)
            logs = ppo_updates(policy, value_head, optimizer, scheduler, roll, cfg, autocast)
            step += 1
            reward = float(roll["scores"].mean())
            first_reward = reward if first_reward is None else first_reward
            last_reward = reward
            tokens = int(roll["mask"].sum())
            append_metrics(run_dir, {"step": step, **logs, "reward": round(reward, 6),
                                     "reward_std": round(float(roll["scores"].std()), 6) if len(batch) > 1 else 0.0,
                                     "kl": round(float(roll["kl"]), 6), "lr": scheduler.get_last_lr()[0],
                                     "completion_tokens": tokens})
            progress.update(task, completed=step, loss=logs["loss"], tps=tokens / max(time.time() - tic, 1e-9))
            if stop.requested and step < steps:
                _save(run_dir, step, policy, value_head, optimizer, scheduler, t.keep_checkpoints)
                info(f"\n[yellow]interrupted at step {step}[/]: saved a checkpoint in {run_dir / 'checkpoints'}; "
                     f"continue with `tunelab train {run_dir / 'config.yaml'} --resume`")
                return TrainResult(run_dir, None, step, None, None, interrupted=True)
            if t.save_every_n_steps and step % t.save_every_n_steps == 0 and step < steps:
                _save(run_dir, step, policy, value_head, optimizer, scheduler, t.keep_checkpoints)
    train_seconds = time.time() - t0

    final_dir = run_dir / "final"
    with atomic_dir(final_dir) as tmp:
        from types import SimpleNamespace

        from safetensors.torch import save_file

        ts._save_final(cfg, SimpleNamespace(model=policy), tok, tmp)
        save_file(value_head.state_dict(), tmp / "value_head.safetensors")
    plot_losses(run_dir)
    write_manifest(run_dir, {
        "run": run_dir.name, "status": "finished", "stage": "ppo", "method": cfg.method, "seed": cfg.seed,
        "model": cfg.model.ref, "steps": step, "val_loss_before": None, "val_loss_after": None,
        "reward_first": first_reward, "reward_last": last_reward,
        "data": {"train": cfg.data.train, "train_sha256": sha256_file(cfg.data.train)},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "train_seconds": round(train_seconds, 3),
        "peak_rss_mb": round(peak_rss_mb()), "processes": 1, "config": config_to_dict(cfg), **ts._environment()})
    rewards = f"reward {first_reward:.3f} -> {last_reward:.3f}, " if first_reward is not None else ""
    info(f"[green]done[/]: {final_dir} ({step} rollouts in {train_seconds:.0f}s, {rewards}peak RSS {peak_rss_mb():.0f} MB)")
    return TrainResult(run_dir, final_dir, step, None, None)


class StopRequest:
    """Ctrl-C during a rollout finishes that rollout, then the run saves and stops: a checkpoint
    never holds half of a step's updates. A second Ctrl-C stops at once, without saving."""

    def __enter__(self):
        self.requested, self.previous = False, None
        try:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: Ctrl-C is not ours to catch
            pass
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        info("\n[yellow]stopping after this rollout[/] (Ctrl-C again to stop now, without saving)")

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def _save(run_dir, step, policy, value_head, optimizer, scheduler, keep):
    ckpt.save_checkpoint(run_dir, step, policy, optimizer, scheduler, {}, keep,
                         extra={"value_head": value_head.state_dict()})


def rollout_prompts(prompts: list[dict], step: int, n: int, seed: int) -> list[dict]:
    """The prompts of rollout `step`: epochs of a seeded shuffle, so a resumed run sees the same ones."""
    per_epoch = max(1, len(prompts) // n)
    epoch, k = divmod(step, per_epoch)
    order = list(range(len(prompts)))
    random.Random(seed + epoch).shuffle(order)
    return [prompts[order[(k * n + i) % len(order)]] for i in range(n)]


# --- rewards -----------------------------------------------------------------------------

def reward_scorer(rl):
    """fn(prompt_texts, completion_texts, rows) -> tensor of scores: the named rewards, summed."""
    from tunelab.training.stages.trl_stages import _rewards

    funcs, procs = _rewards(rl)
    for proc in procs:
        if proc is not None and proc.pad_token is None:
            proc.pad_token = proc.eos_token

    def score(prompt_texts: list[str], completions: list[str], rows: list[dict]) -> torch.Tensor:
        total = torch.zeros(len(completions))
        for fn, proc in zip(funcs, procs):
            if proc is None:  # a Python function on text; the data file's other columns come along
                columns = {k: [r.get(k) for r in rows] for k in rows[0] if k != "prompt"}
                total += torch.tensor(fn(prompts=prompt_texts, completions=completions, **columns), dtype=torch.float)
            else:  # a reward model scores the whole conversation, as it was trained on it
                texts = [proc.apply_chat_template(r["prompt"] + [{"role": "assistant", "content": c}], tokenize=False)
                         if proc.chat_template else p + c for r, p, c in zip(rows, prompt_texts, completions)]
                enc = proc(texts, return_tensors="pt", padding=True, truncation=True, add_special_tokens=False)
                with torch.no_grad():
                    total += fn(**enc).logits[:, 0].float()
        return total

    return score


# --- rollout -----------------------------------------------------------------------------

def rollout(policy, ref, value_head, tok, rows: list[dict], score, cfg: RunConfig, autocast) -> dict:
    """Sample answers and compute everything the updates need (no gradients)."""
    rl = cfg.rl
    prompt_ids = [tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)
                  ["input_ids"][-(cfg.data.max_seq_len - rl.max_new_tokens):] for r in rows]
    width = max(map(len, prompt_ids))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids])  # left-padded for generation
    attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])
    with torch.no_grad(), autocast:
        out = policy.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=rl.temperature,
                              top_k=0, top_p=1.0, max_new_tokens=rl.max_new_tokens, pad_token_id=pad)
    response = out[:, width:]
    mask = _until_first_stop(response, _stop_ids(tok))
    seq = torch.cat([ids, response], 1)
    seq_attn = torch.cat([attn, mask], 1)
    with torch.no_grad():
        logp, values = forward(policy, value_head, seq, seq_attn, width, autocast)
        if rl.beta > 0:
            if ref is None:  # lora/qlora: the starting model is the base without the adapters
                with policy.disable_adapter():
                    ref_logp, _ = forward(policy, None, seq, seq_attn, width, autocast)
            else:
                ref_logp, _ = forward(ref, None, seq, seq_attn, width, autocast)
        else:
            ref_logp = logp
    texts = [tok.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(response, mask)]
    prompt_texts = [r["prompt"][-1]["content"] for r in rows]
    scores = score(prompt_texts, texts, rows)
    kl = (logp - ref_logp) * mask
    rewards = -rl.beta * kl
    last = (mask.sum(1) - 1).clamp(min=0)
    rewards[torch.arange(len(rows)), last] += scores
    advantages, returns = gae(rewards, values, mask)
    return {"seq": seq, "attn": seq_attn, "width": width, "mask": mask, "logp": logp, "values": values,
            "advantages": advantages, "returns": returns, "scores": scores,
            "kl": kl.sum(1).mean()}


def _stop_ids(tok) -> set[int]:
    from tunelab.data.encode import stop_token_ids

    return stop_token_ids(tok) | ({tok.eos_token_id} if tok.eos_token_id is not None else set())


def _until_first_stop(response: torch.Tensor, stops: set[int]) -> torch.Tensor:
    """1 for answer tokens up to and including the first stop token, 0 after it (and for padding)."""
    is_stop = torch.isin(response, torch.tensor(sorted(stops)))
    after = (is_stop.cumsum(1) - is_stop.long()) > 0  # strictly after the first stop
    return (~after).long()


def forward(model, value_head, seq, attn, width: int, autocast):
    """Log-probabilities of the answer tokens (and the value before each, if value_head is given)."""
    positions = (attn.cumsum(-1) - 1).clamp(min=0)  # left padding: as generate() numbers positions
    with autocast:
        out = model(input_ids=seq, attention_mask=attn, position_ids=positions, use_cache=False,
                    output_hidden_states=value_head is not None)
    logits = out.logits[:, width - 1:-1].float()  # position t predicts token t + 1
    logp = torch.gather(F.log_softmax(logits, -1), 2, seq[:, width:, None]).squeeze(-1)
    if value_head is None:
        return logp, None
    hidden = out.hidden_states[-1][:, width - 1:-1].float()
    return logp, value_head(hidden).squeeze(-1)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over each answer; advantages whitened over real tokens."""
    values = values * mask
    adv = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + GAMMA * next_value - values[:, t]
        running = (delta + GAMMA * LAM * running) * mask[:, t]
        adv[:, t] = running
    returns = adv + values
    real = mask.bool()
    if real.sum() > 1:
        mean, std = adv[real].mean(), adv[real].std()
        adv = (adv - mean) / (std + 1e-8) * mask
    return adv, returns


# --- updates -----------------------------------------------------------------------------

def ppo_updates(policy, value_head, optimizer, scheduler, roll: dict, cfg: RunConfig, autocast) -> dict:
    """rl.ppo_epochs optimizer steps on one rollout; each accumulates over micro batches."""
    mb, n = cfg.train.micro_batch_size, roll["seq"].shape[0]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    logs = {"policy_loss": 0.0, "value_loss": 0.0, "clip_fraction": 0.0}
    tokens = max(float(roll["mask"].sum()), 1.0)  # every answer token of the rollout
    for _ in range(cfg.rl.ppo_epochs):
        optimizer.zero_grad(set_to_none=True)
        for i in range(0, n, mb):
            s = slice(i, i + mb)
            mask = roll["mask"][s].float()
            logp, values = forward(policy, value_head, roll["seq"][s], roll["attn"][s], roll["width"], autocast)
            ratio = torch.exp(logp - roll["logp"][s])
            adv = roll["advantages"][s]
            pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - CLIP_EPS, 1 + CLIP_EPS))
            old_v = roll["values"][s]
            v_clipped = old_v + (values - old_v).clamp(-VF_CLIP, VF_CLIP)
            vf = 0.5 * torch.max((values - roll["returns"][s]) ** 2, (v_clipped - roll["returns"][s]) ** 2)
            # sums over tokens / all tokens of the rollout: micro batches add up to the rollout mean
            policy_loss, value_loss = (pg * mask).sum() / tokens, (vf * mask).sum() / tokens
            (policy_loss + VF_COEF * value_loss).backward()
            logs["policy_loss"] += policy_loss.item() / cfg.rl.ppo_epochs
            logs["value_loss"] += value_loss.item() / cfg.rl.ppo_epochs
            clipped = ((ratio.detach() - 1).abs() > CLIP_EPS).float()
            logs["clip_fraction"] += float((clipped * mask).sum()) / tokens / cfg.rl.ppo_epochs
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        optimizer.step()
        scheduler.step()
    logs = {k: round(v, 6) for k, v in logs.items()}
    logs["loss"] = round(logs["policy_loss"] + VF_COEF * logs["value_loss"], 6)
    return logs
