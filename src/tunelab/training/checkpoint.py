"""Resumable checkpoints: trainable weights, optimizer, scheduler, RNG and data position.

checkpoints/step-000200/
  adapter_model.safetensors + adapter_config.json   (lora)  or  model*.safetensors (full)
  optimizer.pt, or under FSDP and DeepSpeed optimizer-rank<r>.pt (each process's shard),
  scheduler.pt, rng-<rank>.pt, trainer_state.json
Each is written into a temporary folder that is renamed when complete, so a crash or Ctrl-C
never leaves a half-written checkpoint behind.
"""

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from tunelab.runs import atomic_dir

STATE = "trainer_state.json"


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / STATE).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_weights(model, folder: Path, tokenizer=None, state_dict: "dict | None" = None) -> None:
    """Adapter (PEFT format) or full weights, as safetensors; plus the tokenizer if given.
    `state_dict`: the weights gathered from every process when FSDP/ZeRO-3 shards them."""
    model.save_pretrained(folder, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, state: dict,
                    keep: int, is_main: bool = True, rank: int = 0, state_dict: "dict | None" = None,
                    extra: "dict | None" = None, shards: "Path | None" = None) -> Path:
    """Write checkpoints/step-N/ (main process only). `optimizer` None: its state is sharded across
    processes and is left out, or comes as `shards`, the folder save_optimizer_shard wrote (moved
    in). `extra`: other modules' state dicts ({"value_head": ...}), stored in extra.safetensors."""
    final = step_dir(run_dir, step)
    if not is_main:
        return final
    with atomic_dir(final) as tmp:
        save_weights(model, tmp, state_dict=state_dict)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if shards is not None:
            for f in shards.iterdir():
                os.replace(f, tmp / f.name)
            shards.rmdir()
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / f"rng-{rank}.pt")
        if extra:
            from safetensors.torch import save_file

            save_file({f"{name}.{k}": v.contiguous() for name, sd in extra.items() for k, v in sd.items()},
                      tmp / "extra.safetensors")
        (tmp / STATE).write_text(json.dumps({**state, "step": step}, indent=2))
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_optimizer_shard(run_dir: Path, step: int, optimizer, rank: int) -> Path:
    """Every process, under FSDP or DeepSpeed: its shard of the optimizer state (FSDP's DTensors as
    their local parts; DeepSpeed's AdamW over this process's flat slice of the weights) into a
    folder beside the checkpoint, which the main process then moves into it."""
    from torch.distributed.tensor import DTensor

    shards = step_dir(run_dir, step).with_name(f".step-{step:06d}.shards")
    shards.mkdir(parents=True, exist_ok=True)
    sd = optimizer.state_dict()
    sd["state"] = {i: {k: v.to_local() if isinstance(v, DTensor) else v for k, v in st.items()}
                   for i, st in sd["state"].items()}
    torch.save(sd, shards / f".optimizer-rank{rank}.pt.tmp")
    os.replace(shards / f".optimizer-rank{rank}.pt.tmp", shards / f"optimizer-rank{rank}.pt")
    return shards


def load_optimizer(folder: Path, optimizer, rank: int = 0, world: int = 1, sharded: bool = False) -> bool:
    """The checkpoint's optimizer state into `optimizer`, where it holds one for it: optimizer.pt for
    a whole optimizer, one shard per process for a sharded one (FSDP, DeepSpeed: the shards are cut
    by the number of processes, so only as many as this run has, each the shape of this process's
    slice). False where it does not: the moments start at zero."""
    from torch.distributed.tensor import DTensor

    if not sharded:
        if not (folder / "optimizer.pt").is_file():
            return False
        sd = torch.load(folder / "optimizer.pt", weights_only=True)
        sd["param_groups"] = [g for g in sd["param_groups"] if g["params"]]  # saved before empty groups were left out
        optimizer.load_state_dict(sd)
        return True
    if len(list(folder.glob("optimizer-rank*.pt"))) != world:
        return False
    sd = torch.load(folder / f"optimizer-rank{rank}.pt", weights_only=True)
    params = [p for group in optimizer.param_groups for p in group["params"]]  # state_dict's numbering
    if len(sd["state"]) != len(params):
        return False
    for i, st in sd["state"].items():
        p = params[i]
        local = p.to_local() if isinstance(p, DTensor) else p
        moments = {k for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0}
        if any(st[k].shape != local.shape for k in moments):
            return False  # cut for another layout (another strategy's shards)
        if isinstance(p, DTensor):
            for k in moments:
                st[k] = DTensor.from_local(st[k], p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
    optimizer.load_state_dict(sd)
    return True


def load_weights(folder: Path, model, method: str) -> None:
    """The checkpoint's trainable weights into `model` (before accelerate wraps it, so that FSDP or
    ZeRO-3 shard what was loaded)."""
    from safetensors.torch import load_file

    if method in ("lora", "qlora"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
    else:
        weights = {}
        for f in sorted(folder.glob("model*.safetensors")):
            weights.update(load_file(f))
        if any(hasattr(p, "ds_id") for p in model.parameters()):  # partitioned by DeepSpeed ZeRO-3
            missing, unexpected = _load_into_zero3(model, weights)
        else:
            missing, unexpected = model.load_state_dict(weights, strict=False)
        tied = {"lm_head.weight"}  # tied to the input embeddings, saved once
        if set(missing) - tied or unexpected:
            raise RuntimeError(f"checkpoint {folder} does not match the model: missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]}")


def _load_into_zero3(model, weights: dict) -> tuple[list, list]:
    """Under DeepSpeed ZeRO-3 transformers loads the model already partitioned (each parameter an
    empty shell holding its slice): gather each whole, copy, and partition it again."""
    import deepspeed

    named = dict(model.named_parameters())
    for name, value in weights.items():
        if name in named:
            with deepspeed.zero.GatheredParameters([named[name]], modifier_rank=0):
                named[name].data.copy_(value)  # every process read the file; rank 0's copy is kept
    return [n for n in named if n not in weights], [n for n in weights if n not in named]


def load_training_state(folder: Path, optimizer, scheduler, rank: int = 0) -> dict:
    """Optimizer (None: leave it fresh; see load_optimizer), scheduler and this process's RNG;
    returns the trainer state."""
    if optimizer is not None:
        load_optimizer(folder, optimizer, rank)
    sd = torch.load(folder / "scheduler.pt", weights_only=True)
    n = len(scheduler.optimizer.param_groups)
    for key in ("base_lrs", "_last_lr", "lr_lambdas"):  # saved before empty groups were left out (one lr for all)
        if isinstance(sd.get(key), list):
            sd[key] = sd[key][:n]
    scheduler.load_state_dict(sd)
    rng = folder / f"rng-{rank}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=True))
    return json.loads((folder / STATE).read_text())


def load_extra(folder: Path) -> dict:
    """The `extra` state dicts of a checkpoint, by name."""
    from safetensors.torch import load_file

    out: dict = {}
    for key, value in load_file(Path(folder) / "extra.safetensors").items():
        name, _, param = key.partition(".")
        out.setdefault(name, {})[param] = value
    return out


def rng_state() -> dict:
    # numpy's key array travels as a tensor so the file loads with weights_only=True (no pickle code)
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos,
                                                    has_gauss, gauss), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
