"""The same loop under torchrun and `accelerate launch`: two CPU processes (gloo) = one process with
the doubled batch. (`accelerate launch` with examples/accelerate/ddp.yaml starts the processes through
torch's launcher, so it runs on CPUs too; FSDP and DeepSpeed need GPUs.)"""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tunelab.runs import read_metrics

DDP_YAML = Path(__file__).resolve().parents[1] / "examples" / "accelerate" / "ddp.yaml"


def write_configs(tiny_config, tmp_path, method: "str | None" = None, **train) -> tuple[Path, Path]:
    """one.yaml: one process, grad_accum_steps 2; two.yaml: grad_accum_steps 1, for two processes.
    method: instead of tiny_config's; train: more train settings."""
    base = {**tiny_config, **({"method": method} if method else {}), "data": {**tiny_config["data"], "val_fraction": 0},
            "train": {**tiny_config["train"], "max_steps": 3, "micro_batch_size": 2, "compile": False, **train}}
    one = tmp_path / "one.yaml"
    one.write_text(yaml.safe_dump({**base, "name": "one", "train": {**base["train"], "grad_accum_steps": 2}}))
    two = tmp_path / "two.yaml"
    two.write_text(yaml.safe_dump({**base, "name": "two", "train": {**base["train"], "grad_accum_steps": 1}}))
    return one, two


def run_losses(runs: Path, name: str) -> tuple[Path, list[float]]:
    (run,) = runs.glob(f"{name}-*")
    return run, [r["loss"] for r in read_metrics(run) if "loss" in r]


def check_same_as_one_process(tmp_path, proc, rel: float = 1e-5, weights: str = "adapter_model.safetensors") -> None:
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = tmp_path / "runs"
    _, loss_one = run_losses(runs, "one")
    run_two, loss_two = run_losses(runs, "two")
    assert len(loss_two) == 3
    # same examples per step, loss normalised over both processes' answer tokens: equal up to
    # float reduction order
    assert loss_two == pytest.approx(loss_one, rel=rel)
    assert (run_two / "final" / weights).is_file() and (run_two / "manifest.json").is_file()


def torchrun_two(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                           "tunelab.cli", "train", str(config), "--quiet"], capture_output=True, text=True, timeout=600)


def test_two_processes_match_one_process_with_doubled_accumulation(tiny_config, tmp_path):
    one, two = write_configs(tiny_config, tmp_path)
    subprocess.run([sys.executable, "-m", "tunelab.cli", "train", str(one), "--quiet"], check=True)
    check_same_as_one_process(tmp_path, torchrun_two(two))


def test_bf16_weights_under_ddp_match_one_process(tiny_config, tmp_path):
    """Full fine-tuning of bf16 weights: each process rounds its copy of the weights with the same
    noise (a function of seed, step and tensor), so the copies stay equal. The gradients are summed
    in bf16, in a different order with two processes: close, not bit-equal."""
    one, two = write_configs(tiny_config, tmp_path, method="full", weight_dtype="bf16", learning_rate=1e-3)
    subprocess.run([sys.executable, "-m", "tunelab.cli", "train", str(one), "--quiet"], check=True)
    check_same_as_one_process(tmp_path, torchrun_two(two), rel=1e-2, weights="model.safetensors")


def test_accelerate_launch_with_the_shipped_ddp_config(tiny_config, tmp_path):
    """The README's command, `accelerate launch --config_file examples/accelerate/ddp.yaml -m tunelab train`."""
    one, two = write_configs(tiny_config, tmp_path)
    subprocess.run([sys.executable, "-m", "tunelab", "train", str(one), "--quiet"], check=True)
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP_YAML),
                           "-m", "tunelab", "train", str(two), "--quiet"],
                          capture_output=True, text=True, timeout=600)
    check_same_as_one_process(tmp_path, proc)
    assert "3 steps of 4 examples" in proc.stdout  # 2 processes x micro batch 2: the effective batch it printed


def test_stepping_in_backward_under_ddp_is_refused(tiny_config, tmp_path):
    """Each weight would be stepped with its own process's gradient, before DDP averages it."""
    _, two = write_configs(tiny_config, tmp_path, method="full", optimizer_in_backward=True, max_grad_norm=0.0,
                            learning_rate=1e-3)
    proc = torchrun_two(two)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "train.optimizer_in_backward=true under ddp with 2 process(es)" in output, output[-3000:]
