"""tunelab.train(config): the whole supervised fine-tuning run, readable top to bottom.

setup (config, run dir, model, data, adapters, optimizer) -> fit (the loop) -> final weights,
loss plot, manifest (written last). The loop is explicit PyTorch on top of accelerate, so the
same code runs on a laptop CPU, one GPU, or under `accelerate launch` / torchrun (DDP, FSDP).

The loss of an optimizer step is the mean over every answer token of the effective batch:
each micro batch contributes (sum of its token losses) / (answer tokens in the whole step, on
all processes). So gradient accumulation gives the same update as one large batch.
"""

import contextlib
import json
import math
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from tunelab.config import RunConfig, config_to_dict, load_config, save_config
from tunelab.data.batching import collate, epoch_order, largest_batch_tokens
from tunelab.data.cache import cache_messages
from tunelab.data.prepare import prepare_data, report_warnings
from tunelab.errors import RunError
from tunelab.hardware import dtype_name, peak_rss_mb, resolve_dtype, set_threads, slow_dtype_warning
from tunelab.log import console, info
from tunelab.runs import (append_metrics, atomic_write_json, atomic_write_text, environment_info, last_run,
                          new_run_dir, plot_losses, sha256_file, truncate_metrics, write_manifest)
from tunelab.training import checkpoint as ckpt
from tunelab.training import distributed, loss_scaling
from tunelab.training.lora import set_dropout_batch
from tunelab.training.loss import token_loss_sum
from tunelab.training.optim import build_optimizer, build_scheduler, step_in_backward

# peft still calls a transformers property renamed in v5; the message says nothing to our users
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


@dataclass
class TrainResult:
    run_dir: Path
    final_dir: Path | None
    steps: int
    val_loss_before: float | None
    val_loss_after: float | None
    interrupted: bool = False


def train(config: "str | Path | dict | RunConfig", overrides=None, resume: "bool | str | Path" = False,
          quiet: bool = False, force: bool = False) -> TrainResult:
    """Fine-tune a model as a config says; write everything to a run directory.

    Args:
        config: YAML path, dict or RunConfig.
        overrides: ["train.max_steps=50", ...] or {"train.max_steps": 50}.
        resume: True continues the newest run of this config from its last checkpoint; a path
            continues that run directory.
        quiet: no progress bar.
        force: train even when `tunelab plan` predicts the run does not fit in this machine's memory.

    Returns:
        TrainResult with the run directory and validation loss before and after.
    """
    from accelerate import Accelerator

    cfg = load_config(config, overrides)
    keep_compiled_code()  # before anything imports bitsandbytes, whose import compiles and fixes the folder
    from tunelab.planning import check_fits, checkpointing_needed

    auto_checkpointing = cfg.train.gradient_checkpointing is None  # before check_fits resolves it
    fit = check_fits(cfg, force)  # a run predicted not to fit stops here, before any weight loads
    name = cfg.name or (Path(config).stem if isinstance(config, (str, Path)) else "run")
    if cfg.stage == "ppo":  # TRL has no PPO trainer any more: ours
        from tunelab.training.stages.ppo import train_ppo

        return train_ppo(cfg, name, resume, quiet)
    if cfg.stage not in ("sft", "pretrain"):  # preference and RL stages run on TRL's trainers
        from tunelab.training.stages.trl_stages import train_trl

        return train_trl(cfg, name, resume, quiet)
    # autocast is ours (below), also on CPU; cpu=True lets accelerate see a torchrun/`accelerate
    # launch` job on CPUs (gloo) instead of running every process alone
    accelerator = Accelerator(mixed_precision="no", cpu=not torch.cuda.is_available())
    distributed.sharding_on_cpus(accelerator)
    distributed.check_deepspeed(accelerator)
    is_main = accelerator.is_main_process
    found = [_run_dir_for(cfg, name, resume, auto_checkpointing) if is_main else None]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(found)  # one run directory, made by the main process
    run_dir, start_ckpt = found[0]
    if is_main:
        save_config(cfg, run_dir / "config.yaml")
    threads = set_threads(cfg.train.threads) if accelerator.device.type == "cpu" else None
    torch.manual_seed(cfg.seed)
    started = time.time()

    # --- model and data --------------------------------------------------------------------
    from tunelab.models.load import describe_model, load_model

    compute_dtype = resolve_dtype(cfg.model.dtype, accelerator.device)
    scaler = loss_scaling.loss_scaler(accelerator, compute_dtype, cfg.train)  # fp16 only; refuses what it cannot scale
    # Trained weights stay fp32 (master weights) and matmuls run in compute_dtype under autocast.
    # A LoRA base never updates, so it loads straight in the compute dtype: half the memory, and
    # autocast stops re-casting every weight on every step. peft keeps the adapters in fp32.
    # A qlora base is 4-bit (bitsandbytes) and dequantizes to compute_dtype inside each matmul.
    # FSDP2 shards the tensors of a layer together and wants one dtype there: fp32 base when sharded.
    frozen_low = (cfg.uses_adapter and compute_dtype != torch.float32
                  and not distributed.shards_parameters(accelerator))
    # train.weight_dtype bf16: full fine-tuning's weights are bf16 themselves (AdamWBf16 updates them)
    bf16_weights = cfg.train.weight_dtype == "bf16"
    if bf16_weights and distributed.shards_optimizer(accelerator):
        raise RunError(f"train.weight_dtype=bf16 under {distributed.strategy(accelerator)}: sharded runs keep "
                       "fp32 master weights; use train.weight_dtype=fp32 there")
    load_dtype = "bf16" if bf16_weights else dtype_name(compute_dtype) if frozen_low else "fp32"
    if is_main and (warning := slow_dtype_warning(accelerator.device.type, compute_dtype, bf16_weights)):
        info(warning)
    if cfg.stage == "pretrain":  # raw text, every token trained; maybe a new model and tokenizer
        from tunelab.training.stages.pretrain import setup_pretrain

        model, tokenizer, data = setup_pretrain(cfg, run_dir, is_main, progress=is_main)
    else:
        model, tokenizer = load_model(cfg.model.ref, dtype=load_dtype,
                                      device=base_device(accelerator, cfg), chat_template=cfg.model.chat_template,
                                      trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.revision,
                                      quantization=cfg.base_quantization or "none",
                                      double_quant=cfg.model.double_quant)
        data = prepare_data(cfg.data, tokenizer, cfg.seed, progress=is_main)
    if bf16_weights and cfg.stage == "pretrain":
        model.to(torch.bfloat16)  # it starts in fp32 (a new model, or loaded so)
    if not data.train:
        raise RunError(f"no training examples left in {cfg.data.train} after encoding; see the warnings above")
    if is_main:
        atomic_write_json(run_dir / "data_report.json", data.report)
        for line in cache_messages(data.report):
            info(line)
        for w in report_warnings(data.report):
            info(f"[yellow]warning:[/] {w}")
    # --- schedule --------------------------------------------------------------------------
    world = accelerator.num_processes
    micro_per_step = cfg.train.grad_accum_steps * world
    batches_per_epoch = math.ceil(len(data.train) / cfg.train.micro_batch_size)
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / micro_per_step))
    total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    effective = cfg.train.micro_batch_size * micro_per_step
    info(f"data: {len(data.train)} train / {len(data.val)} validation sequences ({data.report['format']} format); "
         f"{total_steps} steps of {effective} examples ({total_steps / steps_per_epoch:.2f} epochs); run {run_dir}")

    train_tokens = total_steps * effective * sum(len(e.input_ids) for e in data.train) / len(data.train)
    compiles_auto, eager_because = auto_compile(cfg, accelerator, train_tokens)
    compiled = bool(cfg.train.compile or (cfg.train.compile is None and compiles_auto))
    if fit is not None and fit.auto_checkpointing and cfg.train.gradient_checkpointing:
        # on for the plan's worst case (every row max_seq_len long); the batches that will run may fit without
        epochs = math.ceil(total_steps * micro_per_step / batches_per_epoch)
        largest = largest_batch_tokens([len(e.input_ids) for e in data.train], cfg.train.micro_batch_size, cfg.seed,
                                       epochs, cfg.train.group_by_length, cfg.train.packing)
        if not checkpointing_needed(cfg, largest, compiled):
            cfg.train.gradient_checkpointing = False
            info(f"gradient checkpointing off again (auto): this data's largest micro batch holds {largest} tokens, "
                 f"not the worst case's {cfg.train.micro_batch_size * cfg.data.max_seq_len}, and fits without it")
            if is_main:
                save_config(cfg, run_dir / "config.yaml")
    model.train()
    model.config.use_cache = False
    if cfg.train.packing:
        from tunelab.training.attention import use_packed_attention

        use_packed_attention(model)
    if cfg.uses_adapter:
        from tunelab.training.lora import apply_lora

        model = apply_lora(model, cfg.lora)
    if cfg.train.neftune_alpha:
        from tunelab.training.neftune import enable_neftune

        enable_neftune(model, cfg.train.neftune_alpha)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    info(f"model {cfg.pretrain.from_scratch or cfg.model.ref}: {describe_model(model)}; method {cfg.method}"
         + (" (bf16 weights)" if bf16_weights else "") + f", compute {dtype_name(compute_dtype)}, "
         f"device {accelerator.device.type}"
         + (f", {threads} threads" if threads else "")
         + (f"; {world} processes, {distributed.strategy(accelerator).upper()}" if world > 1 else ""))

    if compiled:
        compile_blocks(model)
        info(f"compiling the model with torch.compile (the first step takes longer; ~{train_tokens / 1e3:.0f}k "
             "tokens to train pays it back)")
    elif cfg.train.compile is None and eager_because:
        info(f"not compiling (train.compile auto): {eager_because}")
    # AdamWBf16's update compiles (5-20 s, once) with the model, or when its eager form (~12 ns per weight
    # and step here: 1.8 s for 135M weights, compiled 0.2 s) would cost more over the run
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = build_optimizer(model, cfg.train, compiled or n_trained * total_steps >= 2e9, cfg.seed)
    scheduler = build_scheduler(optimizer, cfg.train, total_steps)
    if start_ckpt is not None:  # before prepare: FSDP and ZeRO-3 then shard the loaded weights
        ckpt.load_weights(start_ckpt, model, cfg.method)
    distributed.configure_deepspeed(accelerator, cfg.train)
    if distributed.fsdp_mixed_precision(accelerator, compute_dtype):
        info(f"FSDP gathers the weights in {dtype_name(compute_dtype)} and reduces the gradients in fp32")
    if distributed.deepspeed_mixed_precision(accelerator, compute_dtype):
        info("DeepSpeed holds the weights in bf16 and their fp32 masters with AdamW's moments; "
             "gradients are reduced in fp32")
    masters = distributed.fp32_weights_to_masters(accelerator, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    distributed.set_masters(accelerator.unwrap_model(model), masters)
    del masters
    in_backward = cfg.train.optimizer_in_backward
    if in_backward:
        # DDP reduces a gradient after its hook would have stepped the weight with it; FSDP and
        # DeepSpeed step their own sharded optimizers
        if distributed.strategy(accelerator) != "single":  # ddp whenever world > 1
            raise RunError(f"train.optimizer_in_backward=true under {distributed.strategy(accelerator)} with "
                           f"{world} process(es): it steps each weight before the processes have averaged its "
                           "gradient; run one plain process or turn it off")
        step_in_backward(accelerator.unwrap_model(model), optimizer.optimizer)
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "tokens": 0, "elapsed": 0.0}
    if start_ckpt is not None:
        state = ckpt.load_training_state(start_ckpt, None, scheduler, accelerator.process_index)
        with distributed.local_optimizer(accelerator, optimizer) as local:
            restored = ckpt.load_optimizer(start_ckpt, local, accelerator.process_index, world,
                                           distributed.shards_optimizer(accelerator))
        if scaler is not None and "loss_scaler" in state:
            scaler.load_state_dict(state["loss_scaler"])
        if is_main:
            truncate_metrics(run_dir, state["step"])
        info(f"resumed from {start_ckpt} (step {state['step']})"
             + ("" if restored else f"; the optimizer's moments start again from zero: the checkpoint holds none for "
                f"{distributed.strategy(accelerator)} with {world} process(es)"))

    autocast = (torch.autocast(accelerator.device.type, dtype=compute_dtype)
                if compute_dtype != torch.float32 else nullcontext())
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def batch_stream(epoch: int, index: int):
        """Micro batches from (epoch, index) on, forever; yields (epoch, next_index, items)."""
        lengths = [len(e.input_ids) for e in data.train]
        while True:
            order = epoch_order(lengths, cfg.train.micro_batch_size, cfg.seed, epoch, cfg.train.group_by_length)
            for i in range(index, len(order)):
                yield epoch, i + 1, [data.train[j] for j in order[i]]
            epoch, index = epoch + 1, 0

    def evaluate_val() -> float | None:
        if not data.val:
            return None
        t0 = time.time()
        v = validation_loss(model, data.val, cfg.train.micro_batch_size, cfg.train.packing, pad_id,
                            autocast, accelerator)
        state["eval_s"] = state.get("eval_s", 0.0) + time.time() - t0  # kept out of training tokens/s
        return v

    # --- fit -------------------------------------------------------------------------------
    step_start = time.time() - state["elapsed"]  # elapsed includes evaluations; eval_s counts them
    val_before = None
    if state["step"] == 0:
        val_before = evaluate_val()
        if val_before is not None:
            info(f"validation loss before training: {val_before:.4f}")
            if is_main:
                append_metrics(run_dir, _val_record(0, val_before))
    stream = batch_stream(state["epoch"], state["batch_in_epoch"])
    progress = _progress(total_steps, state["step"], disable=quiet or not is_main)
    val_after, interrupted = None, False
    try:
        with progress:
            task = progress.add_task("train", total=total_steps, completed=state["step"], loss=float("nan"), tps=0.0)
            while state["step"] < total_steps:
                t0 = time.time()
                micro = [next(stream) for _ in range(micro_per_step)]
                mine = micro[accelerator.process_index::world]  # this process's share of the step
                local_targets = sum(e.n_targets for _, _, items in mine for e in items)
                n_targets = int(_sum_over_processes(accelerator, local_targets))
                step_loss, step_tokens = 0.0, 0
                for k, (_, _, items) in enumerate(mine):
                    batch = {key: v.to(accelerator.device) for key, v in collate(items, cfg.train.packing, pad_id).items()}
                    last = k == len(mine) - 1
                    if cfg.uses_adapter:
                        set_dropout_batch(cfg.seed, state["step"] * micro_per_step + k, accelerator.process_index)
                    with (nullcontext() if last else accelerator.no_sync(model)):
                        with autocast:
                            loss_sum, _ = token_loss_sum(model, batch, compiled)
                        # DDP averages gradients over processes; scale so the result is sum / N_global
                        loss = loss_sum * (world * distributed.loss_scale(accelerator)) / max(n_targets, 1)
                        accelerator.backward(loss_scaling.scaled(scaler, loss))
                    step_loss += loss_sum.item()
                    step_tokens += sum(len(e.input_ids) for e in items)  # not the bucket's filler
                if cfg.train.max_grad_norm <= 0:  # (always so with optimizer_in_backward)
                    grad_norm = None
                elif bf16_weights:  # AdamWBf16 scales the gradients inside its update
                    grad_norm = optimizer.optimizer.clip_grad_norm_(cfg.train.max_grad_norm)
                else:
                    loss_scaling.unscale(scaler, optimizer)
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
                # in backward: each weight was stepped there; fp16: a step whose gradients overflowed is skipped
                stepped = in_backward or loss_scaling.step(scaler, optimizer)
                if stepped:  # the schedule counts the steps taken, as HF's Trainer does
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                epoch, index, _ = micro[-1]
                step_loss = _sum_over_processes(accelerator, step_loss) / max(n_targets, 1)
                step_tokens = int(_sum_over_processes(accelerator, step_tokens))
                state.update(step=state["step"] + 1, epoch=epoch, batch_in_epoch=index,
                             tokens=state["tokens"] + step_tokens, elapsed=time.time() - step_start)
                step = state["step"]
                tps = step_tokens / max(time.time() - t0, 1e-9)
                if scaler is not None:
                    state["loss_scaler"] = scaler.state_dict()  # a resumed run scales as this one would have
                if not stepped:  # fp16: a gradient overflowed, and its norm is inf or NaN
                    grad_norm = None
                    if is_main:
                        progress.console.print(f"step {step}: an fp16 gradient overflowed; the step was skipped and "
                                               f"the loss scale lowered to {scaler.get_scale():g}")
                progress.update(task, completed=step, loss=step_loss, tps=tps)
                if is_main and not quiet and not console.is_terminal and step % max(1, total_steps // 10) == 0:
                    # logs and CI have no live bar: a line every 10% instead
                    console.print(f"step {step}/{total_steps}  loss {step_loss:.4f}  {tps:.0f} tok/s  "
                                  f"elapsed {state['elapsed']:.0f}s")
                if is_main and (step % cfg.train.log_every_n_steps == 0 or step == total_steps):
                    append_metrics(run_dir, {"step": step, "epoch": round(step / steps_per_epoch, 4),
                                             "loss": step_loss, "lr": scheduler.get_last_lr()[0],
                                             "grad_norm": float(grad_norm) if grad_norm is not None else None,
                                             "tokens": step_tokens, "target_tokens": n_targets,
                                             "tokens_per_s": round(tps, 1), "elapsed_s": round(state["elapsed"], 2),
                                             **({"loss_scale": scaler.get_scale(), "skipped": not stepped}
                                                if scaler is not None else {})})
                if cfg.train.eval_every_n_steps and step % cfg.train.eval_every_n_steps == 0 and step < total_steps:
                    v = evaluate_val()
                    if v is not None and is_main:
                        append_metrics(run_dir, _val_record(step, v))
                        progress.console.print(f"step {step}: validation loss {v:.4f}")
                if cfg.eval.data and cfg.eval.every_n_steps and step % cfg.eval.every_n_steps == 0 \
                        and step < total_steps:
                    _generation_eval(run_dir, model, tokenizer, cfg, step, state, autocast, accelerator)
                if cfg.train.save_every_n_steps and step % cfg.train.save_every_n_steps == 0 and step < total_steps:
                    _save(run_dir, step, model, optimizer, scheduler, state, cfg, accelerator)
    except KeyboardInterrupt:
        interrupted = True
        path = _save(run_dir, state["step"], model, optimizer, scheduler, state, cfg, accelerator)
        info(f"\n[yellow]interrupted at step {state['step']}[/]: saved {path}; continue with "
             f"`tunelab train {run_dir / 'config.yaml'} --resume`")
        return TrainResult(run_dir, None, state["step"], val_before, None, interrupted=True)

    val_after = evaluate_val()
    if cfg.eval.data:
        _generation_eval(run_dir, model, tokenizer, cfg, state["step"], state, autocast, accelerator)
    state["elapsed"] = time.time() - step_start  # now including the final evaluation, as eval_s does
    train_seconds = max(state["elapsed"] - state.get("eval_s", 0.0), 1e-9)
    final_dir = run_dir / "final"
    gathered = distributed.full_state_dict(accelerator, model)  # all processes: a collective under FSDP/ZeRO-3
    if is_main:
        if val_after is not None:
            append_metrics(run_dir, _val_record(state["step"], val_after))
            info(f"validation loss after training: {val_after:.4f}"
                 + (f" (before: {val_before:.4f})" if val_before is not None else ""))
        from tunelab.runs import atomic_dir

        with atomic_dir(final_dir) as tmp:
            ckpt.save_weights(accelerator.unwrap_model(model), tmp, tokenizer, state_dict=gathered)
            if cfg.uses_adapter:
                _point_adapter_at_ref(tmp, cfg.model.ref)
        plot_losses(run_dir)
        write_manifest(run_dir, {
            "run": run_dir.name, "status": "finished", "stage": cfg.stage, "method": cfg.method, "seed": cfg.seed,
            "model": cfg.model.ref, "steps": state["step"], "train_tokens": state["tokens"],
            "val_loss_before": val_before, "val_loss_after": val_after,
            "data": {"train": cfg.data.train, "train_sha256": sha256_file(cfg.data.train),
                     "validation": cfg.data.validation,
                     "validation_sha256": sha256_file(cfg.data.validation) if cfg.data.validation else None},
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "train_seconds": round(train_seconds, 3), "eval_seconds": round(state.get("eval_s", 0.0), 3),
            "tokens_per_s": round(state["tokens"] / train_seconds, 1),
            "peak_rss_mb": round(peak_rss_mb()), "processes": world,
            "config": config_to_dict(cfg), **environment_info()})
        info(f"[green]done[/]: {final_dir} ({state['tokens'] / train_seconds:.0f} training tokens/s, "
             f"peak RSS {peak_rss_mb():.0f} MB)")
    accelerator.wait_for_everyone()
    return TrainResult(run_dir, final_dir, state["step"], val_before, val_after, interrupted)


ACTIVATION_MEMORY_BUDGET = 0.8
# compile costs ~40 s on a cold cache (~9 s cached) and trains ~1.5x the tokens/s (965 against 646 on
# SmolLM2, LoRA): on a cold cache it pays back after ~80k tokens, about two minutes of training here
AUTO_COMPILE_TOKENS = 80_000


def auto_compile(cfg: RunConfig, accelerator, train_tokens: float) -> "tuple[bool, str | None]":
    """train.compile auto: whether to compile, and why not where the run is long enough to pay for it.
    `tunelab plan` restates this rule from its Setup, before any Accelerator exists (planning._compiled)."""
    if train_tokens < AUTO_COMPILE_TOKENS:
        return False, None
    if cfg.base_quantization is not None:
        return False, "a bitsandbytes base's 4/8-bit kernels break compiled graphs"
    if cfg.uses_adapter and distributed.strategy(accelerator) == "deepspeed" and distributed.shards_parameters(accelerator):
        # DeepSpeed gathers each module's weights in hooks, which split the compiled layers at every
        # adapter: eager ran 41% faster (full fine-tuning ran as fast compiled, in less memory;
        # bench/RESULTS.md)
        return False, "adapters under DeepSpeed ZeRO-3 train 41% faster eager (bench/RESULTS.md)"
    return True, None


def base_device(accelerator, cfg: RunConfig) -> torch.device:
    """Where the model loads: the CPU, and accelerate moves it to this process's device (and FSDP or
    DeepSpeed shard it there), except a bitsandbytes base: its 4/8-bit weights cannot be moved after
    loading (accelerate refuses to train them on another device), so they load on this process's
    GPU (cuda:<local rank>), as QLoRA runs do."""
    return accelerator.device if cfg.base_quantization else torch.device("cpu")


def keep_compiled_code() -> Path:
    """Where torch.compile keeps what it builds: with tunelab's other caches (TUNELAB_CACHE,
    ~/.cache/tunelab) in `torch_compile/`, unless TORCHINDUCTOR_CACHE_DIR is set (by the user, or
    by torch once anything has compiled in this process). torch's default is a folder in /tmp, which
    many systems empty at every boot; examples/lora.yaml's first step then took 57 s to compile
    instead of 10 s from the cache (bench/RESULTS.md). Returns the folder."""
    import os

    from tunelab.models.load import cache_dir

    return Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "torch_compile")))


def compile_blocks(model) -> None:
    """Compile the decoder's blocks in place (module names and state_dict keys stay the same).

    Each decoder layer is compiled on its own: the layers share their code, so torch.compile traces
    and builds one layer's graph and reuses it for all of them. Compiling the whole decoder as one
    graph built every layer again: the first step of a LoRA run on SmolLM2 (30 layers) took 223 s
    against 41 s on a cold cache, 76 s against 9 s on a warm one, with the same losses and step
    times (bench/RESULTS.md). Models without a `layers` list compile whole."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base
    # Let the compiled backward recompute cheap elementwise results (activation(gate) * up, norms)
    # instead of saving them, down to 80% of the activations it would keep: peak RSS fell by ~250 MB
    # at no measured cost in speed (bench/RESULTS.md). Read when the graph compiles, at the first step.
    import torch._functorch.config

    torch._functorch.config.activation_memory_budget = ACTIVATION_MEMORY_BUDGET
    # With gradient checkpointing, a layer's forward mutates transformers' output-capture context
    # variable, a side effect that dynamo refuses to trace inside a checkpoint unless it may skip it
    # when the backward recomputes the forward (harmless: nothing captures outputs in training).
    # Refused, every layer broke out of its graph and ran eager (bench/RESULTS.md).
    import torch._dynamo.config

    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    _rope_outside_graph(decoder)
    layers = getattr(decoder, "layers", None)
    blocks = list(layers) if isinstance(layers, torch.nn.ModuleList) and len(layers) else [decoder]
    if blocks[0] is not decoder and isinstance(getattr(decoder, "norm", None), torch.nn.Module):
        blocks.append(decoder.norm)
    for block in blocks:
        # dynamic: packed rows change length every step; this avoids a recompile per length
        block.compile(dynamic=True)


def _rope_outside_graph(decoder) -> None:
    """Compute RoPE's cos and sin once a step, outside the compiled graph. Inside it, inductor folds
    them into every layer's kernels, forward and backward, and evaluates the same sines once per
    layer and element: ~0.05 s of a 1.6 s LoRA step here (bench/RESULTS.md)."""
    for module in decoder.modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            module.forward = torch.compiler.disable(module.forward)


@torch.no_grad()
def validation_loss(model, items, micro_batch_size: int, packing: bool, pad_id: int, autocast,
                    accelerator=None) -> float:
    """Mean loss per answer token over `items` (each process takes a share of the micro batches)."""
    was_training = model.training
    model.eval()
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    chunks = [items[i:i + micro_batch_size] for i in range(0, len(items), micro_batch_size)]
    mine = chunks[rank::world]
    # Where the weights are sharded every forward gathers them from all processes, so each must run
    # as many: a process with a share one short runs one more forward and leaves its loss out
    # (uneven shares hung under FSDP)
    lockstep = accelerator is not None and world > 1 and distributed.shards_parameters(accelerator)
    spare = -(-len(chunks) // world) - len(mine) if lockstep else 0
    for chunk, counted in [(c, True) for c in mine] + [(chunks[0], False)] * spare:
        batch = {k: v.to(dev) for k, v in collate(chunk, packing, pad_id).items()}
        with autocast:
            s, n = token_loss_sum(model, batch)
        if counted:
            total, count = total + s.item(), count + n
    if accelerator and world > 1:
        total, count = _sum_over_processes(accelerator, total), int(_sum_over_processes(accelerator, count))
    model.train(was_training)
    return total / max(count, 1)


def _generation_eval(run_dir, model, tokenizer, cfg, step: int, state: dict, autocast, accelerator) -> None:
    """Answers to `eval.data` scored like `tunelab eval`: one `eval_*` line in metrics.jsonl, the
    answers in eval/training/step-<N>.jsonl. Every process answers its share of the prompts, under
    FSDP and ZeRO-3 on whole weights gathered for it (else in lockstep: each forward needs them all)."""
    from tunelab.evaluation.runner import training_eval

    t0 = time.time()
    # compiled blocks run eagerly here: with a KV cache each layer's cache index would specialize its
    # graph, one recompile per layer, past torch's limit of 8 (compile_blocks compiles layer by layer)
    eager = getattr(torch.compiler, "set_stance", None)
    with (autocast, (eager("force_eager") if eager else contextlib.nullcontext()),
          distributed.whole_weights(accelerator, model, cfg.eval.gather_weights) as whole):
        result = training_eval(accelerator.unwrap_model(model), tokenizer, cfg.eval, step,
                               answer=partial(distributed.generate_in_shares, accelerator, lockstep=not whole))
    state["eval_s"] = state.get("eval_s", 0.0) + time.time() - t0  # kept out of training tokens/s
    if result is None:  # not the main process
        return
    record, preds = result
    atomic_write_text(run_dir / "eval" / "training" / f"step-{step}.jsonl",
                      "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in preds))
    append_metrics(run_dir, record)
    info(f"step {step}: " + ", ".join(f"{k[5:]} {v:.4f}" for k, v in record.items()
                                      if k.startswith("eval_") and k != "eval_n" and v is not None))


def _sum_over_processes(accelerator, value: float) -> float:
    """A number summed over every process (itself when there is one)."""
    if accelerator.num_processes == 1:
        return float(value)
    return float(accelerator.reduce(torch.tensor(float(value), dtype=torch.float64, device=accelerator.device), "sum"))


def _val_record(step: int, val_loss: float) -> dict:
    return {"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}


def _save(run_dir, step, model, optimizer, scheduler, state, cfg, accelerator) -> Path:
    """Called on every process: gathering sharded weights needs them all; the main one writes."""
    gathered = distributed.full_state_dict(accelerator, model)
    shards = None
    if distributed.shards_optimizer(accelerator):  # each process saves its shard of AdamW's moments
        with distributed.local_optimizer(accelerator, optimizer) as local:
            shards = ckpt.save_optimizer_shard(run_dir, step, local, accelerator.process_index)
        accelerator.wait_for_everyone()
    path = ckpt.save_checkpoint(run_dir, step, accelerator.unwrap_model(model),
                                None if distributed.shards_optimizer(accelerator) else optimizer, scheduler, state,
                                keep=cfg.train.keep_checkpoints, is_main=accelerator.is_main_process,
                                rank=accelerator.process_index, state_dict=gathered, shards=shards)
    accelerator.wait_for_everyone()
    return path


def _point_adapter_at_ref(folder: Path, ref: str) -> None:
    """adapter_config.json names the base by its tunelab reference, not a machine-local cache path."""
    import json

    path = folder / "adapter_config.json"
    conf = json.loads(path.read_text())
    conf["base_model_name_or_path"] = ref
    path.write_text(json.dumps(conf, indent=2))


def _run_dir_for(cfg: RunConfig, name: str, resume, auto_checkpointing: bool = False) -> tuple[Path, Path | None]:
    """A new run directory, or the one to resume and its latest checkpoint. auto_checkpointing: the
    config leaves train.gradient_checkpointing to auto, and a resumed run keeps what it resolved."""
    if not resume:
        return new_run_dir(cfg.output_dir, name), None
    run = Path(resume) if not isinstance(resume, bool) else last_run(cfg.output_dir, name)
    if run is None or not run.is_dir():
        raise RunError(f"nothing to resume: no run named {name}-* in {cfg.output_dir}/; start one without --resume")
    found = ckpt.latest_checkpoint(run)
    if found is None:
        if (run / "manifest.json").exists():
            raise RunError(f"{run} already finished; to train longer start a new run (or raise train.max_steps "
                           "and train from its final/ weights)")
        raise RunError(f"{run} has no checkpoint yet (it stopped before the first save); start it again without --resume")
    old = load_config(run / "config.yaml")
    if auto_checkpointing:  # resolved by the run from its data (maybe off again): resume as it ran
        cfg.train.gradient_checkpointing = old.train.gradient_checkpointing
    changed = _diff(config_to_dict(old), config_to_dict(cfg))
    if changed:
        info(f"[yellow]warning:[/] resuming {run.name} with a config that differs from the one it started with: "
             + ", ".join(changed))
    return run, found


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _diff(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k}: {x!r} -> {y!r}")
    return out


def _progress(total: int, done: int, disable: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:.0f} tok/s"),
                    TimeRemainingColumn(), console=console, disable=disable, transient=False)
