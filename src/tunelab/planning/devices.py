"""Named devices: memory a training run may use, datasheet dense bf16/fp16 tensor rate, and the
dtype our loop's `dtype: auto` picks there (fp16 with loss scaling on GPUs without bf16: T4, V100)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Device:
    name: str
    kind: str            # gpu | cpu
    memory_gb: float     # as sold (GB = 1e9 bytes)
    usable_gb: float     # what a training process can have (GPU: less the driver's reserve; laptop: less the OS)
    tflops: float        # dense matmul rate in auto_dtype, datasheet (laptops: a typical CPU)
    auto_dtype: str      # what dtype "auto" resolves to there
    note: str = ""
    # a CPU's matmul unit, whose shares of the peak time its steps (timing.py); the named laptops'
    # "typical laptop CPU" trains in fp32 at an fp32 rate
    cpu_unit: str = "fp32"


DEVICES: dict[str, Device] = {d.name: d for d in [
    Device("t4", "gpu", 16, 15.0, 65, "fp16", "no bf16: auto = fp16, the loss scaled (fp32: 8.1 TFLOP/s)"),
    Device("v100-16gb", "gpu", 16, 15.5, 125, "fp16", "no bf16: auto = fp16, the loss scaled (fp32: 15.7)"),
    Device("v100-32gb", "gpu", 32, 31.5, 125, "fp16", "no bf16: auto = fp16, the loss scaled (fp32: 15.7)"),
    Device("a10", "gpu", 24, 22.5, 125, "bf16"),
    Device("l4", "gpu", 24, 22.5, 121, "bf16"),
    Device("rtx-4090", "gpu", 24, 23.0, 165, "bf16"),
    Device("a100-40gb", "gpu", 40, 39.5, 312, "bf16"),
    Device("a100-80gb", "gpu", 80, 79.0, 312, "bf16"),
    Device("h100-80gb", "gpu", 80, 79.0, 989, "bf16"),
    Device("laptop-8gb", "cpu", 8, 5.5, 0.3, "fp32", "typical laptop CPU, fp32; ~2.5 GB for the OS and apps"),
    Device("laptop-16gb", "cpu", 16, 13.0, 0.3, "fp32", "typical laptop CPU, fp32; ~3 GB for the OS and apps"),
    Device("laptop-32gb", "cpu", 32, 28.5, 0.3, "fp32", "typical laptop CPU, fp32; ~3.5 GB for the OS and apps"),
]}
ALIASES = {"4090": "rtx-4090", "rtx4090": "rtx-4090", "v100": "v100-16gb", "a100": "a100-40gb", "a100-40": "a100-40gb",
           "a100-80": "a100-80gb", "h100": "h100-80gb", "h100-80": "h100-80gb", "t4-16gb": "t4",
           "a10-24gb": "a10", "l4-24gb": "l4"}


def get_device(name: str) -> Device:
    from tunelab.errors import ConfigError

    key = name.lower().replace("_", "-").replace(" ", "-")
    key = ALIASES.get(key, key)
    if key not in DEVICES:
        import difflib

        close = difflib.get_close_matches(key, list(DEVICES) + list(ALIASES), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"device {name!r} is not a named device. {hint}Named devices: {', '.join(DEVICES)} "
                          "(or 'here' for this machine)")
    return DEVICES[key]


def this_machine(rates: dict | None = None) -> Device:
    """This machine as a Device: RAM (or the first GPU's memory), auto dtype, measured rate."""
    import torch

    from tunelab.hardware import resolve_dtype, total_ram_gb
    from tunelab.planning.timing import cpu_matmul_unit

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        mem = props.total_memory / 1e9
        kind, name = "gpu", f"here ({props.name})"
        usable = mem - 0.5
    else:
        mem = total_ram_gb()
        kind, name = "cpu", f"here ({mem:.0f} GB RAM, CPU)"
        usable = mem - 1.0  # the OS and its caches
    dtype = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(resolve_dtype("auto"), "fp32")
    tflops = (rates or {}).get(dtype if dtype != "fp16" else "bf16", 0.0)
    busy = (rates or {}).get("busy_share")
    note = (f"rate measured while other work held the CPU (the measurement got {busy:.0%} of its cores), not "
            "cached: plan again when it is idle" if busy is not None else "measured")  # the plan's rate source
    unit = cpu_matmul_unit((rates or {}).get("bf16"), (rates or {}).get("threads"))
    return Device(name, kind, round(mem, 1), round(usable, 1), tflops, dtype, note, unit)
