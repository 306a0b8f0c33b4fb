"""The same loop under torchrun: two CPU processes (gloo) = one process with the doubled batch.

(`accelerate launch` starts GPU jobs through the same torch launcher; on CPUs it needs MPI.)"""

import subprocess
import sys

import pytest
import yaml

from tunelab.runs import read_metrics


def test_two_processes_match_one_process_with_doubled_accumulation(tiny_config, tmp_path):
    base = {**tiny_config, "data": {**tiny_config["data"], "val_fraction": 0},
            "train": {**tiny_config["train"], "max_steps": 3, "micro_batch_size": 2, "compile": False}}
    one = tmp_path / "one.yaml"
    one.write_text(yaml.safe_dump({**base, "name": "one", "train": {**base["train"], "grad_accum_steps": 2}}))
    two = tmp_path / "two.yaml"
    two.write_text(yaml.safe_dump({**base, "name": "two", "train": {**base["train"], "grad_accum_steps": 1}}))
    subprocess.run([sys.executable, "-m", "tunelab.cli", "train", str(one), "--quiet"], check=True)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                           "tunelab.cli", "train", str(two), "--quiet"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = tmp_path / "runs"
    (run_one,) = runs.glob("one-*")
    (run_two,) = runs.glob("two-*")
    loss_one = [r["loss"] for r in read_metrics(run_one) if "loss" in r]
    loss_two = [r["loss"] for r in read_metrics(run_two) if "loss" in r]
    assert len(loss_two) == 3
    # same examples per step, loss normalised over both processes' answer tokens: equal up to
    # float reduction order
    assert loss_two == pytest.approx(loss_one, rel=1e-5)
    assert (run_two / "final" / "adapter_model.safetensors").is_file() and (run_two / "manifest.json").is_file()
