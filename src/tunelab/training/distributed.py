"""What the loop does differently when accelerate shards the model or the optimizer (FSDP, DeepSpeed).

DDP (and a single process) keeps a whole model and a whole optimizer on every process, so the loop
reads weights directly and the main process saves everything. FSDP and DeepSpeed ZeRO-3 split the
parameters across processes, and FSDP and every DeepSpeed ZeRO stage split the optimizer states:
- parameters outside a module's call are shards, so tunelab's chunked loss runs inside the output
  head's call, where FSDP or ZeRO-3 has gathered its weight (training/loss.py);
- saving gathers the full weights on every process first (a collective: all must call it);
- each process's optimizer state is only its shard: each process saves its own into the checkpoint
  (optimizer-rank<r>.pt), which a run resumed with as many processes loads;
- under ZeRO-3 transformers loads the model already partitioned (each weight an empty shell with
  its shape in ds_shape), so what runs before `prepare` reads sizes and shapes from there;
- DeepSpeed runs the optimizer step inside backward once every `gradient_accumulation_steps`
  micro batches and divides each loss by that number itself, so it is told ours;
- generation evaluation splits the prompts between the processes; under FSDP and ZeRO-3 it first
  gathers the whole weights on each (`eval.gather_weights`), else the processes generate in
  lockstep, as each forward then gathers weights from all of them;
- with bf16 compute FSDP gathers each layer in bf16 and reduces gradients in fp32 (its mixed
  precision), so autocast has no fp32 gathers to cast; DeepSpeed ZeRO 1-3 runs in its own bf16
  mode (bf16 weights, fp32 master weights beside AdamW's moments), and saving and resuming go
  through those masters.
DDP, FSDP and DeepSpeed ZeRO-2/3 are tested here on 2 CPU processes (gloo, tests/test_distributed.py).
"""

import os
import warnings
from contextlib import contextmanager

import torch

from tunelab.errors import RunError


def sharding_on_cpus(accelerator) -> None:
    """Right after the Accelerator is made: accelerate turns FSDP (and DeepSpeed) on for GPU-like
    devices only, so on CPUs an `accelerate launch` with an FSDP config would quietly run DDP, every
    process holding the whole model, gradients and AdamW state. FSDP2 itself shards on CPUs over
    gloo, so where the launcher asked for FSDP the state is switched to it as accelerate does on GPUs
    (its FSDP plugin read from the same environment), and so is DeepSpeed."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        return
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        plugin = FullyShardedDataParallelPlugin()
        if plugin.fsdp_version != 2:
            raise RunError("FSDP on CPUs needs fsdp_version: 2 in the accelerate config (FSDP1 wants GPUs); "
                           "examples/accelerate/fsdp.yaml has it")
        state.fsdp_plugin = plugin
        state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # AcceleratorState() copies it back
    elif os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        _deepspeed_on_cpus(accelerator)


def check_deepspeed(accelerator) -> None:
    """Right after the Accelerator is made, under DeepSpeed: ZeRO stage 0 is refused (plain data
    parallel inside DeepSpeed's own optimizer wrapper, whose state tunelab's checkpoints do not read:
    the first save failed, after the steps before it had run; DDP is the same without DeepSpeed), so
    is a DeepSpeed config's own fp16 mode (its loss scaling is not wired into the loop, and the
    weights saved would be fp16 roundings of its masters; fp16 compute runs under DDP and FSDP), and
    the warnings of its collectives are silenced: they call torch.distributed's deprecated names,
    and each call warned again (the filters change between calls), 3200 lines in a 4-step ZeRO-3
    run burying the progress."""
    if strategy(accelerator) != "deepspeed":
        return
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")
    if _zero_stage(accelerator) == 0:
        raise RunError("the DeepSpeed config sets zero_stage 0 (plain data parallel), which tunelab does not run: "
                       "launch with examples/accelerate/ddp.yaml for the same without DeepSpeed, or set "
                       "zero_stage to 1, 2 or 3 (examples/accelerate/deepspeed_zero2.yaml)")
    if str(accelerator.state.deepspeed_plugin.deepspeed_config.get("fp16", {}).get("enabled", False)).lower() == "true":
        raise RunError("the DeepSpeed config turns fp16 on, which tunelab does not run (it would save fp16 roundings "
                       "of the weights): remove its fp16 section; tunelab sets DeepSpeed's precision from model.dtype "
                       "(bf16: DeepSpeed's bf16 mode, or fp32). For fp16 compute launch with "
                       "examples/accelerate/ddp.yaml or fsdp.yaml, where tunelab scales the loss")


def _deepspeed_on_cpus(accelerator) -> None:
    """accelerate's own DeepSpeed switch (AcceleratorState with cpu=False), over the gloo group
    that is already up: DeepSpeed's CPU accelerator speaks gloo when oneCCL is not installed."""
    from accelerate.state import PartialState
    from accelerate.utils import DeepSpeedPlugin, DistributedType, is_deepspeed_available

    if not is_deepspeed_available():
        raise RunError("the accelerate config asks for DeepSpeed, which is not installed: pip install deepspeed "
                       "(or launch with examples/accelerate/fsdp.yaml, which shards on CPUs without it)")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)  # joins the existing group
    state = accelerator.state
    plugin = DeepSpeedPlugin()  # read from the launcher's environment, as Accelerator() does on GPUs
    plugin.set_mixed_precision("no")  # tunelab's autocast does the bf16 compute
    plugin.select(_from_accelerator_state=True)
    state.deepspeed_plugins = plugin
    state.distributed_type = DistributedType.DEEPSPEED
    PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED
    accelerator.deepspeed_engine_wrapped = None


def fsdp_mixed_precision(accelerator, compute_dtype) -> bool:
    """Before prepare: under FSDP with bf16 (fp16) compute, FSDP2 gathers each layer's weights in the
    compute dtype and reduces the gradients in fp32 (its MixedPrecisionPolicy), as FSDP runs on GPUs
    are set up: half the bytes gathered, and no whole fp32 layer gathered only for autocast to cast
    it, whose bf16 copies the backward keeps (2 bytes of every weight in every process). The shards,
    AdamW and the saved weights stay fp32. Returns whether it set that."""
    if strategy(accelerator) != "fsdp" or compute_dtype == torch.float32:
        return False
    from torch.distributed.fsdp import MixedPrecisionPolicy

    accelerator.state.fsdp_plugin.mixed_precision_policy = MixedPrecisionPolicy(
        param_dtype=compute_dtype, reduce_dtype=torch.float32)
    return True


def deepspeed_mixed_precision(accelerator, compute_dtype) -> bool:
    """Before `prepare`: under DeepSpeed ZeRO 1-3 with bf16 compute, DeepSpeed's own bf16 mode, as
    DeepSpeed runs on GPUs are set up: the model's weights are bf16 (ZeRO-3 gathers each layer so,
    and ZeRO-1/2 keep a whole copy at 2 bytes a weight, not 4), their fp32 master copies sit with
    AdamW, split between the processes as its moments are, and gradients are reduced in fp32 (and
    under ZeRO-2/3 summed over micro batches in fp32; ZeRO-1 sums them in bf16).
    Before, every weight stayed fp32 and autocast cast each gathered layer, whose bf16 copies the
    backward kept in every process. The masters start from the fp32 weights loaded, not from their
    bf16 roundings (`fp32_weights_to_masters`), and saving reads them (`full_state_dict`). ZeRO stage
    0 never gets here (`check_deepspeed` refuses it). Returns whether
    DeepSpeed runs in bf16, also where the user's own DeepSpeed config turned it on."""
    if strategy(accelerator) != "deepspeed":
        return False
    plugin = accelerator.state.deepspeed_plugin
    ds = plugin.deepspeed_config
    if compute_dtype == torch.bfloat16 and _zero_stage(accelerator) > 0 and not deepspeed_bf16(accelerator):
        ds["bf16"] = {**ds.get("bf16", {}), "enabled": True}
        ds.setdefault("communication_data_type", "fp32")  # gradients reduced in fp32, as FSDP's are here
        if _zero_stage(accelerator) >= 2:  # and summed over micro batches in fp32 (ZeRO-1 would swap optimizers)
            ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    return deepspeed_bf16(accelerator)


def deepspeed_bf16(accelerator) -> bool:
    """DeepSpeed holds the weights in bf16 and their fp32 masters inside its optimizer."""
    if strategy(accelerator) != "deepspeed":
        return False
    bf16 = accelerator.state.deepspeed_plugin.deepspeed_config.get("bf16", {})
    return str(bf16.get("enabled", False)).lower() == "true"


def strategy(accelerator) -> str:
    """single | ddp | fsdp | deepspeed."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return "fsdp"
    if kind == DistributedType.DEEPSPEED:
        return "deepspeed"
    return "ddp" if accelerator.num_processes > 1 else "single"


def shards_parameters(accelerator) -> bool:
    kind = strategy(accelerator)
    return kind == "fsdp" or (kind == "deepspeed" and _zero_stage(accelerator) == 3)


def shards_optimizer(accelerator) -> bool:
    return strategy(accelerator) in ("fsdp", "deepspeed")


@contextmanager
def local_optimizer(accelerator, optimizer):
    """The optimizer whose state_dict is this process's own: under DeepSpeed the AdamW that ZeRO
    steps on this process's flat slice of the weights (its engine's own save would write the
    weights again, in its own format). ZeRO-3 hands that AdamW its slices only while it steps
    (so does its own state_dict); they are handed over for as long as this lasts."""
    if strategy(accelerator) != "deepspeed":
        yield optimizer
        return
    zero = optimizer.optimizer  # accelerate's wrapper -> ZeRO's optimizer -> AdamW
    if not hasattr(zero, "_set_fp32_optimizer_param_groups"):  # ZeRO 1 and 2
        yield zero.optimizer
        return
    zero._set_fp32_optimizer_param_groups()
    try:
        yield zero.optimizer
    finally:
        zero._clear_fp32_optimizer_param_groups()


def configure_deepspeed(accelerator, train) -> None:
    """Before `prepare`: DeepSpeed's micro batch, accumulation and clipping are the config's `train.*`
    (there is no dataloader to read them from, and its step must fall on our step boundary)."""
    if strategy(accelerator) != "deepspeed":
        return
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ours = {"train_micro_batch_size_per_gpu": ("micro_batch_size", train.micro_batch_size),
            "gradient_accumulation_steps": ("grad_accum_steps", train.grad_accum_steps),
            "gradient_clipping": ("max_grad_norm", train.max_grad_norm)}
    for key, (name, value) in ours.items():
        if ds.get(key, "auto") not in ("auto", value):
            raise RunError(f"the DeepSpeed config sets {key}={ds[key]} but train.{name}={value}; remove {key} "
                           f"from the accelerate/DeepSpeed config (tunelab sets it from train.{name})")
        ds[key] = value
    # DeepSpeed's own bucket sizes (5e8 elements: 2 GB of fp32 buffer per process) suit GPUs with tens
    # of GB; "auto" has accelerate size them from the model's hidden size, as HF's Trainer docs advise
    zero = ds.setdefault("zero_optimization", {})
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
        zero.setdefault(key, "auto")
    accelerator.gradient_accumulation_steps = train.grad_accum_steps


def loss_scale(accelerator) -> int:
    """DeepSpeed divides each micro batch's loss by its accumulation steps; undo that."""
    return accelerator.gradient_accumulation_steps if strategy(accelerator) == "deepspeed" else 1


def full_state_dict(accelerator, model) -> "dict | None":
    """The whole model's weights, gathered from every process when they are sharded, and in
    DeepSpeed's bf16 mode with the trained ones' fp32 masters, not their bf16 working copies (call
    it on all processes); None when each process already holds them all as they are to be saved."""
    if not shards_parameters(accelerator) and not deepspeed_bf16(accelerator):
        return None
    state = accelerator.get_state_dict(model)
    unwrapped = accelerator.unwrap_model(model)
    if deepspeed_bf16(accelerator):
        from deepspeed.utils import safe_get_full_fp32_param

        for name, param in unwrapped.named_parameters():
            if param.requires_grad:
                master = safe_get_full_fp32_param(param)  # a collective: every process asks for each
                if state is not None:
                    state[name] = master.cpu()
    # gathered, a tied output head is a copy of the embeddings; saved once, as one process saves it
    if state is not None and getattr(getattr(unwrapped, "config", None), "tie_word_embeddings", False):
        for tied in getattr(unwrapped, "_tied_weights_keys", None) or {}:
            state.pop(tied, None)
    return state


def fp32_weights_to_masters(accelerator, model):
    """Before `prepare` in DeepSpeed's bf16 mode: this process's fp32 values of the trained weights
    (of their ZeRO-3 partitions), for `set_masters` after it. DeepSpeed makes its fp32 masters from
    the bf16 weights, so they would start as roundings: updates smaller than bf16's step (most of
    them at fine-tuning's learning rates) then move no working weight until they add up past it,
    where fp32 masters move the roundings of some at once (measured: the loss after 6 steps of
    SmolLM2 was 1.79 against 1.77). On a resume these are the checkpoint's fp32 weights, loaded.
    Under ZeRO-3 transformers loaded the model partitioned in fp32; the partitions are cast to bf16
    here, as DeepSpeed's bf16 zero.Init would have made them. {name: (fp32 tensor, whether it is
    this process's ZeRO-3 partition)}; None outside that mode."""
    if not deepspeed_bf16(accelerator):
        return None
    weights = {}
    for name, param in model.named_parameters():
        partition = getattr(param, "ds_tensor", None)
        if partition is None:  # whole (ZeRO-1/2; adapters made after loading): DeepSpeed casts it
            if param.requires_grad:
                weights[name] = (param.detach(), False)  # its fp32 storage, kept past DeepSpeed's cast
            continue
        if param.requires_grad:
            weights[name] = (partition.data, True)
        if partition.dtype == torch.float32:
            partition.data = partition.data.to(torch.bfloat16)
            param.data = param.data.to(torch.bfloat16)  # the empty shell's dtype is the gathered weight's
    return weights


def set_masters(model, weights: "dict | None") -> None:
    """After `prepare`: DeepSpeed's fp32 masters set to `fp32_weights_to_masters`' values."""
    if not weights:
        return
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param

    for name, param in model.named_parameters():
        if name in weights:
            value, partition = weights[name]
            (safe_set_local_fp32_param if partition else safe_set_full_fp32_param)(param, value)


@contextmanager
def whole_weights(accelerator, model, gather: bool = True):
    """For generation: under FSDP and ZeRO-3 every weight is gathered once, for the length of the
    block, and sharded again after it; each process holds the whole model meanwhile. Otherwise every
    new token's forward would gather each layer from all processes and free it again: the whole
    model moved between them per token. Yields whether the weights are whole on each process (always
    without sharding; under FSDP and ZeRO-3 when `gather`). Call it on every process: gathering is
    a collective. model: what `accelerator.prepare` returned."""
    if not shards_parameters(accelerator):
        yield True
    elif not gather:
        yield False
    elif strategy(accelerator) == "fsdp":
        with _fsdp_unsharded(model):
            yield True
    else:
        with _zero3_gathered(model):
            yield True


@contextmanager
def _fsdp_unsharded(model):
    """Every FSDP2 unit unsharded, and kept so through its forwards (its reshard-after-forward
    setting off meanwhile, then put back as it was: the root's differs from the layers')."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    saved = []  # read from FSDP2's state: it has a setter for the setting and no getter
    for unit in units:
        state = unit._get_fsdp_state()
        saved.append((state._auto_reshard_after_forward, [g.post_forward_mesh_info for g in state._fsdp_param_groups]))
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit, (auto, mesh_infos) in zip(units, saved):
            unit.reshard()
            state = unit._get_fsdp_state()
            state._auto_reshard_after_forward = auto
            for group, info in zip(state._fsdp_param_groups, mesh_infos):
                group.post_forward_mesh_info = info


@contextmanager
def _zero3_gathered(engine):
    """Every ZeRO-3 partition gathered, with DeepSpeed's module hooks off meanwhile (each module's
    forward would partition its weights again after use), as TRL gathers for generation."""
    import deepspeed
    from trl.models.utils import add_hooks, remove_hooks

    with deepspeed.zero.GatheredParameters(list(engine.parameters())):
        remove_hooks(engine)
        try:
            yield
        finally:
            add_hooks(engine)


def generate_in_shares(accelerator, model, tokenizer, prompts: list, sampling, batch_size: int,
                       lockstep: bool = False) -> "list[str] | None":
    """`generation.generate` split between the processes: each answers every world-th prompt, and the
    main process gets every answer in order (None elsewhere). lockstep: the weights are sharded (see
    `whole_weights`), so each forward gathers them from all processes: each process answers as many
    prompts (a short share repeats one, left out) and generation keeps their token steps together."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from tunelab.generation import generate

    rank, world = accelerator.process_index, accelerator.num_processes
    if world == 1:
        return generate(model, tokenizer, prompts, sampling, batch_size)
    mine = list(range(rank, len(prompts), world))
    spare = -(-len(prompts) // world) - len(mine) if lockstep else 0
    asked = mine + [mine[0] if mine else 0] * spare
    # FSDP2 gathers the outermost module's own weights (embeddings, final norm) in that module's
    # forward, which generation skips where the outermost is a PeftModel: gather them for its length
    root = model if lockstep and isinstance(model, FSDPModule) else None
    if root is not None:
        root.unshard()
    try:
        answers = generate(model, tokenizer, [prompts[i] for i in asked], sampling, batch_size, synced=lockstep)
    finally:
        if root is not None:
            root.reshard()
    shares: list = [None] * world
    dist.all_gather_object(shares, list(zip(mine, answers)))  # zip leaves the repeats out
    if not accelerator.is_main_process:
        return None
    ordered: list = [None] * len(prompts)
    for i, text in (pair for share in shares for pair in share):
        ordered[i] = text
    return ordered


def _zero_stage(accelerator) -> int:
    plugin = accelerator.state.deepspeed_plugin
    return int(plugin.zero_stage) if plugin is not None else 0
