"""tunelab.plan: will a run fit, where, how long will it take, and what to change if it does not.

    import tunelab
    result = tunelab.plan("examples/lora.yaml")                       # a config, as `train` reads it
    result = tunelab.plan(model="7b", method="qlora", max_seq_len=2048, device="a100-40gb")
    result.fits_here, result.breakdown.peak, result.advice
"""

from dataclasses import dataclass, field, replace
from pathlib import Path

from tunelab.errors import ConfigError
from tunelab.planning.arch import Arch, resolve_arch
from tunelab.planning.devices import DEVICES, Device, get_device, this_machine
from tunelab.planning.memory import STRATEGIES, Breakdown, Setup, breakdown
from tunelab.planning.timing import Timing, estimate, machine_rates

HEADROOM = 0.9  # above 90% of a device's usable memory a run is "tight"
METHODS = ("full", "lora", "qlora")


@dataclass
class Verdict:
    device: Device
    dtype: str
    peak_bytes: float
    status: str                    # fits | tight | does not fit
    timing: Timing | None = None
    advice: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.status != "does not fit"


@dataclass
class PlanResult:
    """A run's plan: its architecture, setup, memory breakdown here, and a verdict per device."""

    arch: Arch
    setup: Setup
    breakdown: Breakdown                      # for the first device (this machine unless `device` is given)
    verdicts: list[Verdict]
    steps: int | None = None
    compiled: bool = False                    # whether the run's blocks will be torch.compile'd (its time)
    auto_checkpointing: bool = False          # train.gradient_checkpointing auto turned it on: needed to fit
    data: "DataTokens | None" = None          # what the config's data brings to a step; None: worst case
    data_unread: str | None = None            # why the plan could not read the data it tried to (then: worst case)

    @property
    def peak_bytes(self) -> float:
        return self.breakdown.peak

    @property
    def here(self) -> Verdict:
        return self.verdicts[0]

    @property
    def fits_here(self) -> bool:
        return self.verdicts[0].fits

    @property
    def advice(self) -> list[str]:
        return self.verdicts[0].advice

    def to_dict(self) -> dict:
        b = self.breakdown
        return {"model": self.arch.name, "source": self.arch.source, "params": self.arch.n_params,
                "trainable_params": b.trainable_params, "setup": _values(self.setup), "compiled": self.compiled,
                "auto_checkpointing": self.auto_checkpointing, "data": _values(self.data) if self.data else None,
                "data_unread": self.data_unread,
                "peak_gb": round(b.peak / 1e9, 3), "terms_gb": {k: round(v / 1e9, 3) for k, v in b.terms.items()},
                "devices": [{"device": v.device.name, "dtype": v.dtype, "peak_gb": round(v.peak_bytes / 1e9, 2),
                             "usable_gb": v.device.usable_gb, "status": v.status, "advice": v.advice,
                             "step_s": v.timing.step_s if v.timing else None,
                             "total_s": v.timing.total_s if v.timing else None} for v in self.verdicts]}

    def __str__(self) -> str:
        from tunelab.planning.report import format_plan

        return format_plan(self)


def _values(record) -> dict:
    """A dataclass's fields for JSON: the functions some carry (the data's rebatching) left out."""
    return {k: v for k, v in vars(record).items() if not callable(v)}


def plan(config_or_path=None, *, model: str | None = None, method: str | None = None,
         max_seq_len: int | None = None, micro_batch_size: int | None = None,
         grad_accum_steps: int | None = None, gradient_checkpointing: bool | None = None,
         lora_rank: int | None = None, dtype: str | None = None, optimizer: str | None = None,
         device: "str | list[str] | None" = None, devices: "list[str] | None" = None,
         steps: int | None = None, overrides=None, timing: bool = True, processes: int = 1,
         batch_tokens: int | None = None, data: bool | None = None, compiled: bool | None = None,
         strategy: str = "single", world: int = 1) -> PlanResult:
    """Predict peak memory and time of a training run, here and on named devices.

    Args:
        config_or_path: a run config (YAML path, dict or RunConfig) as `train` takes, or None.
            A config.json path (or its folder) is taken as `model`.
        model: alias, folder, .gguf, run dir, hub id, a config.json, or a known size ("7b", "70b").
        method: full | lora | qlora. Other keyword arguments override the config's values.
        optimizer: adamw | adamw_8bit (default: the config's train.optimizer).
        device: a named device (see `tunelab.planning.DEVICES`) or "here"; the first verdict and
            the breakdown are for it. Default: this machine.
        devices: the other devices to judge (default: every named device; [] for none).
        steps: optimizer steps, for the total time (default: the config's max_steps).
        timing: False skips the time estimate (and this machine's matmul calibration).
        processes: training processes on the first device, each with its own copy (torchrun).
        strategy: how `accelerate launch` (or torchrun) splits the run over its processes: single,
            ddp, fsdp, zero1, zero2 or zero3 (DeepSpeed's stages); the memory is one process's.
        world: the run's processes on all machines, which fsdp and zero split the state over.
        batch_tokens: the data's largest micro batch in tokens, where known (the training loop
            knows it once the data is encoded); default: the worst case, micro_batch_size rows of
            max_seq_len tokens.
        data: read, encode and batch the config's training data as `tunelab train` will (sft
            stage; through the tokenized cache, which the run then reuses): the time is for its
            real micro batches, the memory for its largest, and steps default to its epochs'.
            Default (None): read it where the config's data.train is a local file and no
            batch_tokens is given; where that fails, plan the worst case and say why
            (`data_unread`). False: the worst case; True: read it, and raise what fails.
        compiled: whether the run compiles (default: train.compile as the loop resolves it). A
            compiled run saves less for the backward; the memory counts that where the run surely
            compiles (train.compile true, this argument, or auto with the data read: the worst
            case's rows may pass auto's threshold where the real, shorter ones do not).

    With train.gradient_checkpointing auto (None) and no `gradient_checkpointing` given, the plan
    resolves it as `tunelab train` does: on only if the run does not fit on the first device
    without it and fits with it (`auto_checkpointing` then says so).

    Returns:
        PlanResult; `str(result)` is the printed report.

    Raises:
        ModelError: the model cannot be resolved to an architecture (the message lists the fixes).
        ConfigError: a bad method, device or number.
    """
    if _is_model_config(config_or_path):  # `tunelab plan path/to/config.json`: the model alone
        if model is not None:
            raise ConfigError(f"{config_or_path} is a model's config.json and model={model!r} is given too; pass one")
        config_or_path, model = None, str(config_or_path)
    cfg = _config(config_or_path, model, overrides)
    s = Setup(method=method or cfg.method, max_seq_len=max_seq_len or cfg.data.max_seq_len,
              micro_batch_size=micro_batch_size or cfg.train.micro_batch_size,
              grad_accum_steps=grad_accum_steps or cfg.train.grad_accum_steps,
              gradient_checkpointing=bool(cfg.train.gradient_checkpointing if gradient_checkpointing is None
                                          else gradient_checkpointing),  # auto: first without (below)
              lora_rank=lora_rank or cfg.lora.rank, lora_targets=cfg.lora.target_modules,
              lora_dropout=cfg.lora.dropout, optimizer=optimizer or cfg.train.optimizer,
              weight_dtype=cfg.train.weight_dtype, optimizer_in_backward=cfg.train.optimizer_in_backward,
              batch_tokens=batch_tokens, strategy=strategy, world=world)
    _check(s, s.optimizer)
    arch = resolve_arch(model or cfg.model.ref)
    wanted_dtype = dtype or cfg.model.dtype
    tokens_of_data, data_unread = None, None
    asked = data
    if data is None and batch_tokens is None:  # real rows are mostly far shorter: 3.1 against 8.6 GB for lora.yaml
        data_unread = _unreadable_data(config_or_path, cfg)
        data = data_unread is None
    if data:
        from tunelab.errors import TunelabError
        from tunelab.planning.data import data_tokens

        try:
            tokens_of_data = data_tokens(cfg, s, progress=True)
        except TunelabError as e:
            if asked:
                raise
            data_unread = "; ".join(e.problems) if isinstance(e, ConfigError) else " ".join(str(e).split())
    if tokens_of_data is not None:
        s = replace(s, batch_tokens=batch_tokens or tokens_of_data.largest_batch_tokens,
                    batch_tokens_for=None if batch_tokens else tokens_of_data.largest_for,
                    mean_batch_tokens=tokens_of_data.mean_batch_tokens,
                    answer_fraction=tokens_of_data.answer_fraction, attention_len=tokens_of_data.attention_len)
    steps = steps or cfg.train.max_steps or (tokens_of_data.steps if tokens_of_data else None)
    will_compile = _compiled(cfg, s, steps) if compiled is None else compiled
    surely = compiled is not None or cfg.train.compile is not None or tokens_of_data is not None
    s = replace(s, compiled=will_compile and surely)
    rates = machine_rates() if timing else None
    first = [this_machine(rates)] if device in (None, "here") else [get_device(device)]
    others = [get_device(d) for d in (devices if devices is not None else list(DEVICES))]
    compiled = timing and will_compile
    checkpointed = replace(s, gradient_checkpointing=True)
    auto = (gradient_checkpointing is None and cfg.train.gradient_checkpointing is None
            and not _can_run(arch, s, first[0], wanted_dtype, processes)
            and _can_run(arch, checkpointed, first[0], wanted_dtype, processes))
    if auto:
        s = checkpointed
    verdicts = [judge(arch, s, d, wanted_dtype, steps if timing else None, timing, compiled=compiled)
                for d in first + [d for d in others if d.name != first[0].name]]
    b = breakdown(arch, replace(s, compute_dtype=verdicts[0].dtype), verdicts[0].device.kind)
    return PlanResult(arch, s, b, verdicts, steps, compiled, auto_checkpointing=auto, data=tokens_of_data,
                      data_unread=data_unread or None)


def _unreadable_data(config_or_path, cfg) -> str | None:
    """Why a plan cannot read the run's own rows, or None where it can: a config (not a model alone)
    of the sft stage whose training data is a local file or folder (a hub dataset is not downloaded
    to plan). "" where there is no data to read."""
    if config_or_path is None or not cfg.data.train:
        return ""
    if cfg.stage != "sft":
        return f"the plan reads the sft stage's data, and this config's stage is {cfg.stage!r}"
    if not Path(cfg.data.train).exists():
        return f"data.train {cfg.data.train} is not a local file; a hub dataset is not downloaded to plan"
    return None


def _compiled(cfg, s: Setup, steps: int | None) -> bool:
    """train.compile as the training loop resolves it; for auto, the loop counts the data's real
    tokens, the plan its worst case (steps x micro batches of max_seq_len tokens) unless it read the data."""
    if cfg.train.compile is not None:
        return bool(cfg.train.compile)
    from tunelab.training.loop import AUTO_COMPILE_TOKENS

    tokens = (steps or 0) * (s.mean_batch_tokens or s.tokens) * s.grad_accum_steps
    # the loop leaves these eager (training/loop.py: auto_compile)
    quantized_base = cfg.model.quantization is not None or s.method == "qlora"
    zero3_adapters = s.method != "full" and s.strategy == "zero3"
    return tokens >= AUTO_COMPILE_TOKENS and not quantized_base and not zero3_adapters


def judge(arch: Arch, s: Setup, dev: Device, dtype: str = "auto", steps: int | None = None,
          timing: bool = True, compiled: bool = False) -> Verdict:
    """Verdict for one device, with the cheapest changes that make the run fit there."""
    d, peak = _peak_on(arch, s, dev, dtype)
    s = replace(s, compute_dtype=d)
    v = Verdict(dev, d, peak, _status(peak, dev))
    if timing and dev.tflops > 0:
        here = dev.name.startswith("here")
        v.timing = estimate(arch, s, dev.tflops, dev.kind, steps, dev.note if here else "datasheet",
                            compiled=compiled, cpu_unit=dev.cpu_unit)
    if v.status != "fits":
        v.advice = advise(arch, s, dev)
    return v


def advise(arch: Arch, s: Setup, dev: Device) -> list[str]:
    """The cheapest change that makes the run fit on `dev`, as config settings.

    Changes in order of cost: what leaves the result unchanged first (smaller micro batch with
    more accumulation, gradient checkpointing), then bf16 weights for full fine-tuning (rounded
    updates, nearly the same result), then what changes the method (LoRA, then QLoRA),
    then shorter sequences. The first single change that fits wins; else the changes are added in
    that order until it fits, and any that turn out not to be needed are dropped."""
    return [_fix_text(arch, s, dev, long=True)] if _fix(arch, s, dev) is not None else [_no_fix(arch, s, dev)]


def fsdp_world(arch: Arch, s: Setup, dev: Device, most: int = 64) -> int | None:
    """The fewest processes (one a device) over which FSDP makes the run fit on devices like `dev`,
    as the run is set up now; None where 64 would not, or where the run is split already."""
    if s.strategy != "single":
        return None
    world = 2
    while world <= most:
        if _fits(arch, replace(s, strategy="fsdp", world=world), dev):
            return world
        world *= 2
    return None


def short_fix(arch: Arch, s: Setup, dev: Device) -> str:
    """'fits with: lora + grad ckpt' for the devices table."""
    fix = _fix(arch, s, dev)
    return "no change fits" if fix is None else "with " + " + ".join(label for label, _, _ in fix)


def _candidates(arch: Arch, s: Setup, dev: Device) -> list[tuple[str, str, dict]]:
    fits = lambda x: _fits(arch, x, dev)  # noqa: E731
    out = []
    if s.micro_batch_size > 1:
        mbs = s.micro_batch_size // 2
        while mbs > 1 and not fits(replace(s, **_rows(s, micro_batch_size=mbs))):
            mbs //= 2
        accum = max(1, s.grad_accum_steps * s.micro_batch_size // mbs)
        out.append((f"micro batch {mbs}", f"train.micro_batch_size={mbs} train.grad_accum_steps={accum} "
                    "(same effective batch, same result)", _rows(s, micro_batch_size=mbs, grad_accum_steps=accum)))
    if not s.gradient_checkpointing:
        out.append(("grad ckpt", "train.gradient_checkpointing=true (same result, slower: LoRA ~30%, full ~10-15%)",
                    {"gradient_checkpointing": True}))
    if s.method == "full" and s.weight_dtype == "fp32" and not s.shards_optimizer:  # sharded: fp32 master weights
        out.append(("bf16 weights", "train.weight_dtype=bf16 (weights, gradients and AdamW in bf16 with stochastic "
                    "rounding: half their memory)", {"weight_dtype": "bf16"}))
    if s.method == "full" and not s.optimizer_in_backward and s.strategy == "single":  # others average first
        mbs = s.micro_batch_size * s.grad_accum_steps
        out.append(("step in backward", f"train.optimizer_in_backward=true train.max_grad_norm=0 "
                    + (f"train.micro_batch_size={mbs} train.grad_accum_steps=1 " if s.grad_accum_steps > 1 else "")
                    + "(each gradient freed at its weight's step; no gradient clipping)",
                    {"optimizer_in_backward": True, **_rows(s, micro_batch_size=mbs, grad_accum_steps=1)}))
    if s.method == "full":
        out.append(("lora", "method=lora (adapters on a frozen base)", {"method": "lora"}))
    if s.method in ("full", "lora"):
        out.append(("qlora", "method=qlora (LoRA on a 4-bit base; slower on a CPU)", {"method": "qlora"}))
    seq = s.max_seq_len // 2
    while seq > 128 and not fits(replace(s, **_rows(s, max_seq_len=seq))):
        seq //= 2
    if s.max_seq_len > 128:
        out.append((f"seq {max(seq, 128)}", f"data.max_seq_len={max(seq, 128)} (longer examples are cut)",
                    _rows(s, max_seq_len=max(seq, 128))))
    return out


def _rows(s: Setup, **changes) -> dict:
    """`changes` to a micro batch's rows or their length, with the data's largest micro batch (where the
    plan knows it) anew: batched again with those rows and lengths where the plan read the data, else
    bounded by the new worst case and by the old largest batch times the growth in rows."""
    if s.batch_tokens is None:
        return changes
    rows = changes.get("micro_batch_size", s.micro_batch_size)
    seq = changes.get("max_seq_len", s.max_seq_len)
    if s.batch_tokens_for is not None:
        return {**changes, "batch_tokens": s.batch_tokens_for(rows, seq)}
    return {**changes, "batch_tokens": min(rows * seq, s.batch_tokens * max(1, -(-rows // s.micro_batch_size)))}


def _fix(arch: Arch, s: Setup, dev: Device):
    cands = _candidates(arch, s, dev)
    for c in cands:
        if _fits(arch, replace(s, **c[2]), dev):
            return [c]
    chosen = []
    for c in cands:
        chosen.append(c)
        if _fits(arch, _apply(s, chosen), dev):
            for extra in list(chosen[:-1]):  # drop what the later changes made unnecessary
                rest = [x for x in chosen if x is not extra]
                if _fits(arch, _apply(s, rest), dev):
                    chosen = rest
            return [c for c in chosen if not (c[0] == "lora" and any(x[0] == "qlora" for x in chosen))]
    return None


def _apply(s: Setup, changes) -> Setup:
    for _, _, kw in changes:
        s = replace(s, **kw)
    return s


def _fix_text(arch: Arch, s: Setup, dev: Device, long: bool = True) -> str:
    fix = _fix(arch, s, dev)
    peak = breakdown(arch, _apply(s, fix), dev.kind).peak
    return f"{'; '.join(text for _, text, _ in fix)}: predicted peak {peak / 1e9:.1f} GB"


def _no_fix(arch: Arch, s: Setup, dev: Device) -> str:
    smallest = _apply(s, _candidates(arch, s, dev))
    peak = breakdown(arch, smallest, dev.kind).peak
    return (f"no change fits: even QLoRA with micro batch 1, gradient checkpointing and short sequences needs "
            f"{peak / 1e9:.1f} GB; use a device with more memory or a smaller model")


def _fits(arch: Arch, s: Setup, dev: Device) -> bool:
    return _status(breakdown(arch, s, dev.kind).peak, dev) == "fits"


def _peak_on(arch: Arch, s: Setup, dev: Device, dtype: str = "auto") -> tuple[str, float]:
    """The compute dtype on `dev` ("auto": the device's) and the run's peak bytes there."""
    d = dev.auto_dtype if dtype == "auto" else dtype
    return d, breakdown(arch, replace(s, compute_dtype=d), dev.kind).peak


def _can_run(arch: Arch, s: Setup, dev: Device, dtype: str = "auto", processes: int = 1) -> bool:
    """Whether `processes` copies of the run fit on `dev`, tightly or not (as `check_fits` judges)."""
    return _status(_peak_on(arch, s, dev, dtype)[1] * processes, dev) != "does not fit"


def _status(peak: float, dev: Device) -> str:
    usable = dev.usable_gb * 1e9
    if peak <= HEADROOM * usable:
        return "fits"
    return "tight" if peak <= usable else "does not fit"


def _check(s: Setup, optimizer: str) -> None:
    problems = []
    if s.method not in METHODS:
        problems.append(f"method={s.method!r}: use one of {', '.join(METHODS)}")
    if optimizer not in ("adamw", "adamw_8bit"):
        problems.append(f"optimizer={optimizer!r}: use adamw or adamw_8bit")
    if s.strategy not in STRATEGIES:
        problems.append(f"strategy={s.strategy!r}: use one of {', '.join(STRATEGIES)}")
    for key in ("max_seq_len", "micro_batch_size", "grad_accum_steps", "lora_rank", "world"):
        if getattr(s, key) < 1:
            problems.append(f"{key}={getattr(s, key)} must be >= 1")
    if problems:
        raise ConfigError(problems)


def _is_model_config(x) -> bool:
    if not isinstance(x, (str, Path)):
        return False
    p = Path(x)
    return p.suffix == ".json" or (p.is_dir() and (p / "config.json").is_file())


def _config(config_or_path, model, overrides):
    """The run config to plan; data.train may be empty (the plan needs no data)."""
    from tunelab.config import RunConfig
    from tunelab.config.load import _build, _parse_overrides, _resolve_data_paths, _set_dotted, read_yaml

    if isinstance(config_or_path, RunConfig) and not overrides:
        cfg = config_or_path
    else:
        if isinstance(config_or_path, RunConfig):
            from tunelab.config import config_to_dict

            config_or_path = config_to_dict(config_or_path)
        p = Path(str(config_or_path)) if isinstance(config_or_path, (str, Path)) else None
        raw = read_yaml(p) if p is not None else dict(config_or_path or {})
        problems: list[str] = []
        for key, value in _parse_overrides(overrides, problems):
            _set_dotted(raw, key, value)
        cfg = _build(RunConfig, raw, "", problems)
        if problems:
            raise ConfigError(problems)
        if p is not None:  # as load_config: a relative data path may be beside the config (which the plan reads)
            _resolve_data_paths(cfg, p.parent)
    return cfg


def _local_processes() -> int:
    """Training processes that share the device the check plans for, each holding its own copy: on a
    CPU every process on this machine (torchrun's LOCAL_WORLD_SIZE); on GPUs each process has one of
    its own (accelerate and torchrun put local rank r on GPU r), so those sharing one are
    LOCAL_WORLD_SIZE over the GPUs, rounded up. Counting 8 processes on one GPU's memory would stop
    every run on an 8-GPU node that needs more than an eighth of a GPU."""
    import os

    import torch

    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        return -(-local // max(torch.cuda.device_count(), 1))
    return local


def launched_strategy() -> tuple[str, int]:
    """How the launcher of this process splits the run, and over how many processes in all, read
    from what `accelerate launch` and torchrun put in the environment (the Accelerator that
    `tunelab train` makes reads the same): ("single", 1) for a process started alone."""
    import json
    import os

    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        # fsdp_reshard_after_forward false keeps every layer gathered from its forward to its backward:
        # whole weights, split gradients and moments, planned as ZeRO-2 (whose fp32 copy errs high)
        keeps_gathered = env.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() in ("false", "shard_grad_op")
        return ("zero2" if keeps_gathered else "fsdp"), world
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        if stage is None and env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
            try:
                ds = json.loads(Path(env["ACCELERATE_DEEPSPEED_CONFIG_FILE"]).read_text())
                stage = ds.get("zero_optimization", {}).get("stage")
            except (OSError, ValueError, AttributeError):
                stage = None  # DeepSpeed reports an unreadable config itself, after the check
        stage = int(stage) if str(stage) in ("0", "1", "2", "3") else 2  # accelerate's default stage
        return ("ddp" if stage == 0 else f"zero{stage}"), world  # the loop refuses stage 0 before its check
    return ("ddp" if world > 1 else "single"), world


def _processes_text(procs: int, strategy: str, world: int) -> str:
    """' (2 processes here, FSDP over 4)' for the check's messages; '' for one process alone."""
    parts = ([f"{procs} processes here"] if procs > 1 else []) + (
        [f"{strategy.upper()} over {world} processes"] if strategy != "single" else [])
    return f" ({', '.join(parts)})" if parts else ""


def checkpointing_needed(cfg, batch_tokens: int, compiled: bool = False) -> bool:
    """Whether the run does not fit here without gradient checkpointing when its largest micro batch
    holds `batch_tokens` tokens. `tunelab train` asks once its data is encoded, where `check_fits`
    turned checkpointing on for the worst case: real batches are often far shorter (SmolLM2-1.7B's
    LoRA on the alpaca demo here: 8 GB without it, 22% faster than with it)."""
    procs = _local_processes()
    strategy, world = launched_strategy()
    result = plan(cfg, devices=[], timing=False, processes=procs, gradient_checkpointing=False,
                  batch_tokens=batch_tokens, compiled=compiled, strategy=strategy, world=world)
    return _status(result.here.peak_bytes * procs, result.here.device) == "does not fit"


def check_fits(cfg, force: bool = False) -> "PlanResult | None":
    """`tunelab train`'s first step: stop a run predicted not to fit here, before any weight loads.
    The prediction is for the worst case (every row max_seq_len tokens); where that does not fit, an
    sft run is planned again with its data's own largest micro batch, and stopped only if that does
    not fit either.

    Returns the plan (None when the model's architecture cannot be known without loading it: the
    run then goes on and the loader reports any problem). Raises RunError with the advice."""
    from tunelab.errors import ModelError, RunError
    from tunelab.log import info

    procs = _local_processes()
    strategy, world = launched_strategy()
    planned = dict(devices=[], timing=False, processes=procs, strategy=strategy, world=world)
    try:
        result = plan(cfg, data=False, **planned)  # no tokenizing before the check
    except ModelError:
        return None
    v = result.here
    need = v.peak_bytes * procs
    status = _status(need, v.device)
    if status == "does not fit" and not force and cfg.stage == "sft":
        # the worst case has every row max_seq_len long; real rows are mostly far shorter, so before
        # refusing, plan the data's own largest micro batch (encoded through the cache the run reuses)
        worst = need
        result = plan(cfg, data=True, **planned)
        v = result.here
        need = v.peak_bytes * procs
        status = _status(need, v.device)
        if status != "does not fit":
            info(f"memory: the worst case (every row data.max_seq_len={cfg.data.max_seq_len} tokens) would need "
                 f"{worst / 1e9:.1f} GB, more than the {v.device.usable_gb:.1f} GB usable here; this data's largest "
                 f"micro batch holds {result.data.largest_batch_tokens} tokens and needs {need / 1e9:.1f} GB")
    if cfg.train.gradient_checkpointing is None:  # auto, resolved by the plan; config.yaml records it
        cfg.train.gradient_checkpointing = result.setup.gradient_checkpointing
        if result.auto_checkpointing:
            info(f"gradient checkpointing on (train.gradient_checkpointing auto): without it this run is predicted "
                 f"not to fit in the {v.device.usable_gb:.1f} GB usable on {v.device.name}; with it, {need / 1e9:.1f} GB")
    if status == "does not fit" and not force:
        raise RunError(
            f"this run is predicted to need {need / 1e9:.1f} GB at its peak"
            + _processes_text(procs, strategy, world)
            + f" and {v.device.name} has {v.device.usable_gb:.1f} GB usable, so it would run out of memory. "
            + " ".join(f"Cheapest change that fits: {a}." for a in v.advice)
            + (f" That is for this data's largest micro batch ({result.data.largest_batch_tokens} tokens)."
               if result.data else f" The check assumes every row is data.max_seq_len={cfg.data.max_seq_len} tokens"
               " long: `tunelab data inspect` shows your rows' lengths, and a max_seq_len just above the longest"
               " cuts nothing.")
            + " See the whole breakdown with `tunelab plan <config>`; train anyway with --force (force=True).")
    if status != "fits":
        info(f"[yellow]warning:[/] predicted peak memory {need / 1e9:.1f} GB of {v.device.usable_gb:.1f} GB usable "
             f"({status}{'; --force' if status == 'does not fit' else ''})")
    return result
