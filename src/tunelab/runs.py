"""The run directory contract: layout, atomic writes, metrics, manifest, loss plot.

runs/<name>-<timestamp>/
  config.yaml        every default resolved
  data_report.json   counts, token lengths, truncations, duplicates
  metrics.jsonl      one JSON line per logged step / evaluation
  checkpoints/step-000200/   resumable state (adapter or weights, optimizer, scheduler, RNG)
  final/             adapter (PEFT format) or full weights (safetensors) + tokenizer
  loss.png           training and validation loss
  manifest.json      versions, data sha256, seed, hardware, times; written last
A file is written under a temporary name and renamed, so a crash never leaves a half-written
file where a finished one belongs.
"""

import contextlib
import hashlib
import json
import os
import platform
import shutil
import time
from pathlib import Path

MANIFEST = "manifest.json"
METRICS = "metrics.jsonl"


def atomic_write_text(path: "str | Path", text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_json(path: "str | Path", obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(final: "str | Path"):
    """Yield a temporary folder beside `final`; rename it to `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def new_run_dir(output_dir: "str | Path", name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run = Path(output_dir) / f"{name}-{stamp}"
    n = 1
    while run.exists():
        n += 1
        run = Path(output_dir) / f"{name}-{stamp}-{n}"
    run.mkdir(parents=True)
    return run


def last_run(output_dir: "str | Path", name: str) -> Path | None:
    """The newest run directory of that name (the one `--resume` continues)."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    runs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(f"{name}-")
            and (p / "config.yaml").exists()]
    return max(runs, key=lambda p: (p.stat().st_mtime, p.name), default=None)


def append_metrics(run_dir: "str | Path", record: dict) -> None:
    with open(Path(run_dir) / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def read_metrics(run_dir: "str | Path") -> list[dict]:
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(run_dir: "str | Path", after_step: int) -> None:
    """On resume, forget lines logged after the checkpoint: they will be logged again."""
    kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= after_step]
    atomic_write_text(Path(run_dir) / METRICS, "".join(json.dumps(r) + "\n" for r in kept))


def sha256_file(path: "str | Path") -> str:
    path = Path(path)
    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(path.rglob("*")):
            if f.is_file():
                h.update(f.relative_to(path).as_posix().encode())
                h.update(sha256_file(f).encode())
        return h.hexdigest()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def environment_info() -> dict:
    """Versions and hardware, for the manifest: what a reader needs to reproduce a number."""
    import importlib.metadata as md

    from tunelab.hardware import describe_hardware
    from tunelab.training.kernels import missing_prerequisite

    versions = {}
    for pkg in ("tunelab", "torch", "transformers", "peft", "accelerate", "datasets"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {"python": platform.python_version(), "platform": platform.platform(),
            "versions": versions,
            # cpu_kernels: whether packed attention can run tunelab's C++ kernels (their rounding differs slightly)
            "hardware": {**describe_hardware(), "cpu_kernels": missing_prerequisite() or "available"}}


def write_manifest(run_dir: "str | Path", info: dict) -> None:
    atomic_write_json(Path(run_dir) / MANIFEST, info)


def plot_losses(run_dir: "str | Path") -> Path | None:
    """loss.png: training loss per step and validation loss at each evaluation."""
    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean per target token)")
    ax.set_title(Path(run_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(run_dir) / "loss.png"
    tmp = out.with_name(".loss.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
    return out
