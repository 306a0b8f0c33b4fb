"""The printed plan: setup, memory breakdown, a verdict per device with time, and advice."""

from tunelab.planning.timing import CPU_UNITS, RECOMPUTE_TIME_WEIGHT


def _gb(x: float) -> str:
    return f"{x / 1e9:6.2f} GB"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def format_plan(r) -> str:
    from dataclasses import replace

    from tunelab.planning import fsdp_world, short_fix

    a, s, b = r.arch, r.setup, r.breakdown
    here = r.verdicts[0]
    auto = (f" (auto: needed to fit on {here.device.name} if every row is max_seq_len long; `tunelab train` turns "
            "it off again if the data's real batches fit without it)") if r.auto_checkpointing else ""
    lines = [
        f"model   {a.name}: {a.n_params / 1e9:.3f}B parameters, {a.num_layers} layers, hidden {a.hidden_size}, "
        f"{a.num_heads}/{a.num_kv_heads} heads, vocab {a.vocab_size}  [{a.source}]",
        f"run     {s.method}"
        + (f" rank {s.lora_rank}" if s.method != "full" else "")
        + f", {here.dtype} compute, max_seq_len {s.max_seq_len}, micro batch {s.micro_batch_size} "
        f"x {s.grad_accum_steps} accumulation, gradient checkpointing {'on' if s.gradient_checkpointing else 'off'}"
        f"{auto}; "
        f"trainable {b.trainable_params / 1e6:.2f}M"
        + (f"; {s.strategy.upper()} over {s.world} processes, memory per process" if s.strategy != "single" else ""),
        _data_line(r),
        "",
        f"peak memory on {here.device.name}:",
    ]
    for k, v in b.terms.items():
        if v:
            note = b.notes.get(k, "")
            if k == "activations" and r.compiled and not s.compiled and here.device.kind == "cpu":
                note += "; eager: auto may compile, which saves ~half (sure once the plan reads the rows)"
            lines.append(f"  {k:34} {_gb(v)}  {note}")
    lines.append(f"  {'peak':34} {_gb(b.peak)}  (gradients, the logits chunk and the step's temporaries are not "
                 "all alive at once)")
    lines += ["", f"  {'device':26} {'usable':>8} {'peak':>8} {'dtype':>5}  {'step':>7} {'total':>9}  verdict"]
    for v in r.verdicts:
        t = v.timing
        verdict = v.status if v.status == "fits" else f"{v.status}; {short_fix(r.arch, replace(r.setup, compute_dtype=v.dtype), v.device)}"
        lines.append(f"  {v.device.name:26} {v.device.usable_gb:6.1f}GB {v.peak_bytes / 1e9:6.1f}GB {v.dtype:>5}  "
                     f"{_duration(t.step_s) if t else '-':>7} {_duration(t.total_s) if t else '-':>9}  {verdict}")
    if here.timing:
        t = here.timing
        lines.append(f"\n  time: {t.flops_per_token / 1e9:.2f} GFLOP per token; {here.device.name}: {t.tokens_per_s:.3g} "
                     f"tokens/s at {t.rate_tflops:.2f} TFLOP/s peak ({t.rate_source}"
                     + ("; cached in ~/.cache/tunelab/matmul_rate.json, delete it to measure again" if t.rate_source == "measured" else "")
                     + f") x {t.efficiency:.0%}, the share of it this loop's steps reach "
                     + ("compiled" if r.compiled else "uncompiled")
                     + (f" on {CPU_UNITS[here.device.cpu_unit]}" if here.device.kind == "cpu" else "")
                     + (f"; the checkpointed forward's recompute at {RECOMPUTE_TIME_WEIGHT[r.setup.method]:.0%} of "
                        "its FLOPs' time, as measured" if r.setup.gradient_checkpointing
                        and RECOMPUTE_TIME_WEIGHT[r.setup.method] != 1 else "")
                     + ("" if r.steps else "; give steps (train.max_steps) for a total"))
    verdict = {"fits": "fits", "tight": "fits, but with little room (under 10% free)",
               "does not fit": "does NOT fit"}[here.status]
    lines.append(f"\nverdict: {verdict} on {here.device.name} ({here.peak_bytes / 1e9:.1f} of "
                 f"{here.device.usable_gb:.1f} GB usable)")
    for advice in here.advice:
        lines.append(f"advice:  {advice}")
    world = fsdp_world(r.arch, replace(s, compute_dtype=here.dtype), here.device) if here.status != "fits" else None
    if world:
        lines.append(f"or split it as it is: FSDP over {world} {'GPUs' if here.device.kind == 'gpu' else 'machines'} "
                     f"like this one fits (`--strategy fsdp --world {world}`; accelerate launch with "
                     "examples/accelerate/fsdp.yaml, see \"More than one GPU or machine\" in the README)")
    return "\n".join(lines)


def _data_line(r) -> str:
    """What the time and memory assume about the batches: the data's own or the worst case."""
    d = r.data
    if d is None:
        why = (f"the data could not be read: {r.data_unread}" if r.data_unread else
               "a config whose data.train is a local file is planned with its own rows, mostly far shorter")
        return f"tokens  the worst case: every row max_seq_len tokens long, all of them answers ({why})"
    return (f"tokens  from this config's data: {d.examples} examples, {d.mean_batch_tokens:.0f} tokens a micro batch "
            f"on average (largest {d.largest_batch_tokens}), {d.answer_fraction:.0%} of them answers; "
            f"{d.steps} steps")
