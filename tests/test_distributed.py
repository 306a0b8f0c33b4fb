"""The same loop under torchrun and `accelerate launch`: two CPU processes (gloo) = one process with
the doubled batch, under DDP (examples/accelerate/ddp.yaml, or torchrun alone), FSDP2
(examples/accelerate/fsdp.yaml) and DeepSpeed ZeRO-2/3 (examples/accelerate/deepspeed_zero*.yaml),
which tunelab switches on for CPUs (accelerate alone would run DDP). The DeepSpeed cases skip where
deepspeed is not installed (the [test] extra installs it)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tunelab.runs import read_metrics

DDP_YAML = Path(__file__).resolve().parents[1] / "examples" / "accelerate" / "ddp.yaml"
FSDP_YAML = DDP_YAML.with_name("fsdp.yaml")
LAUNCH_YAMLS = {"ddp": DDP_YAML, "fsdp": FSDP_YAML, "zero2": DDP_YAML.with_name("deepspeed_zero2.yaml"),
                "zero3": DDP_YAML.with_name("deepspeed_zero3.yaml")}


def launch_yaml(strategy: str) -> Path:
    if strategy.startswith("zero"):
        pytest.importorskip("deepspeed")
    return LAUNCH_YAMLS[strategy]


def write_configs(tiny_config, tmp_path, method: "str | None" = None, val_fraction: float = 0,
                  **train) -> tuple[Path, Path]:
    """one.yaml: one process, grad_accum_steps 2; two.yaml: grad_accum_steps 1, for two processes.
    method: instead of tiny_config's; train: more train settings."""
    base = {**tiny_config, **({"method": method} if method else {}),
            "data": {**tiny_config["data"], "val_fraction": val_fraction},
            "train": {**tiny_config["train"], "max_steps": 3, "micro_batch_size": 2, "compile": False, **train}}
    one = tmp_path / "one.yaml"
    one.write_text(yaml.safe_dump({**base, "name": "one", "train": {**base["train"], "grad_accum_steps": 2}}))
    two = tmp_path / "two.yaml"
    two.write_text(yaml.safe_dump({**base, "name": "two", "train": {**base["train"], "grad_accum_steps": 1}}))
    return one, two


def run_losses(runs: Path, name: str) -> tuple[Path, list[float]]:
    (run,) = runs.glob(f"{name}-*")
    return run, [r["loss"] for r in read_metrics(run) if "loss" in r]


def both_runs(tmp_path) -> tuple[Path, Path]:
    """The run directories of one.yaml and two.yaml."""
    return run_losses(tmp_path / "runs", "one")[0], run_losses(tmp_path / "runs", "two")[0]


def validation_losses(run: Path) -> list[float]:
    return [r["val_loss"] for r in read_metrics(run) if "val_loss" in r]


def weights_file(method: str) -> str:
    return "model.safetensors" if method == "full" else "adapter_model.safetensors"


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


def accelerate_launch(accelerate_yaml: Path, config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_yaml),
                           "-m", "tunelab", "train", str(config), "--quiet", *args],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("strategy, method", [("fsdp", "full"), ("fsdp", "lora"), ("zero2", "full"),
                                              ("zero3", "full"), ("zero3", "lora")])
def test_sharded_on_two_cpu_processes_matches_one_process(tiny_config, tmp_path, strategy, method):
    """The README's FSDP and DeepSpeed commands, on CPUs: each process holds half of AdamW's moments
    (and under FSDP and ZeRO-3 half of every weight: transformers loads it partitioned under ZeRO-3),
    and the run trains as one process with the doubled accumulation; final/ holds the whole
    weights, gathered, the tied output head saved once as one process saves it."""
    weights = weights_file(method)
    # weight decay: on the matrices only, which ZeRO-3 hands over as empty 1-d shells
    lr = {"learning_rate": 1e-3, "weight_decay": 0.1} if method == "full" else {}
    one, two = write_configs(tiny_config, tmp_path, method=method, **lr)
    subprocess.run([sys.executable, "-m", "tunelab", "train", str(one), "--quiet"], check=True)
    proc = accelerate_launch(launch_yaml(strategy), two)
    check_same_as_one_process(tmp_path, proc, weights=weights)
    said = " ".join(proc.stdout.split())
    assert f"2 processes, {'FSDP' if strategy == 'fsdp' else 'DEEPSPEED'}" in said, proc.stdout[-2000:]
    assert "1.6M parameters" in said  # counted whole where ZeRO-3 partitioned them
    check_same_final_weights(tmp_path, weights)


BF16_SAID = {"fsdp": "FSDP gathers the weights in bf16 and reduces the gradients in fp32",
             "zero2": "DeepSpeed holds the weights in bf16 and their fp32 masters",
             "zero3": "DeepSpeed holds the weights in bf16 and their fp32 masters"}


def in_bf16(*configs: Path) -> None:
    for config in configs:
        cfg = yaml.safe_load(config.read_text())
        cfg["model"]["dtype"] = "bf16"
        config.write_text(yaml.safe_dump(cfg))


@pytest.mark.parametrize("strategy, method", [("fsdp", "full"), ("fsdp", "lora"), ("zero2", "full"),
                                              ("zero3", "full"), ("zero3", "lora")])
def test_bf16_compute_under_fsdp_and_deepspeed_trains_as_one_process(tiny_config, tmp_path, strategy, method):
    """With bf16 compute FSDP gathers each layer in bf16 and reduces gradients in fp32 (its mixed
    precision), and DeepSpeed runs in its bf16 mode (bf16 weights, fp32 masters with AdamW); before,
    both gathered fp32 weights for autocast to cast and keep the copies. The losses stay those of one
    process under autocast to bf16's precision, and final/ holds the trained weights in fp32: under
    DeepSpeed its masters, not their bf16 working copies."""
    from safetensors.torch import load_file

    lr = {"learning_rate": 1e-3} if method == "full" else {}
    one, two = write_configs(tiny_config, tmp_path, method=method, **lr)
    in_bf16(one, two)
    subprocess.run([sys.executable, "-m", "tunelab", "train", str(one), "--quiet"], check=True)
    proc = accelerate_launch(launch_yaml(strategy), two)
    check_same_as_one_process(tmp_path, proc, rel=2e-2, weights=weights_file(method))
    assert BF16_SAID[strategy] in " ".join(proc.stdout.split())
    assert "is deprecated. Please use" not in proc.stderr  # DeepSpeed's collectives warned at every call
    final = load_file(both_runs(tmp_path)[1] / "final" / weights_file(method))
    trained = [v for k, v in final.items() if "layers.0." in k and v.dim() == 2]
    assert trained and all(v.dtype == torch.float32 for v in trained)
    # masters, trained past bf16's resolution: not every value is a bf16 number
    assert any(not torch.equal(v, v.bfloat16().float()) for v in trained)


SCALED_TUNELAB = """import sys
from tunelab.training import loss_scaling
loss_scaling.INIT_SCALE = float(sys.argv.pop(1))
from tunelab.cli import main
sys.exit(main())
"""


@pytest.mark.parametrize("strategy, init_scale", [("ddp", 2.0 ** 16), ("fsdp", 2.0 ** 14)])
def test_fp16_compute_scales_its_loss_under_ddp_and_fsdp(tiny_config, tmp_path, strategy, init_scale):
    """fp16 (GPUs without bf16): each process scales its loss and unscales its gradients (under FSDP
    its shards, with the overflow verdict agreed over all of them); the run trains as one process.
    FSDP gathers the weights in fp16, so their gradients are fp16 too (in one process autocast
    leaves the embedding fp32): at 2^16 its first step overflowed, was skipped and halved the scale,
    as fp16 runs on GPUs do. Both runs start at a scale that fits."""
    one, two = write_configs(tiny_config, tmp_path, method="full", learning_rate=1e-3)
    for config in (one, two):
        cfg = yaml.safe_load(config.read_text())
        cfg["model"]["dtype"] = "fp16"
        config.write_text(yaml.safe_dump(cfg))
    script = tmp_path / "scaled_tunelab.py"
    script.write_text(SCALED_TUNELAB)
    subprocess.run([sys.executable, str(script), str(init_scale), "train", str(one), "--quiet"], check=True)
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(launch_yaml(strategy)), str(script), str(init_scale), "train", str(two), "--quiet"],
                          capture_output=True, text=True, timeout=600)
    check_same_as_one_process(tmp_path, proc, rel=5e-3, weights="model.safetensors")
    for run in both_runs(tmp_path):
        assert [r["loss_scale"] for r in read_metrics(run) if "loss" in r] == [init_scale] * 3


@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_deepspeeds_bf16_masters_start_from_the_fp32_weights_loaded(tiny_config, tiny_model_dir, tmp_path, strategy):
    """DeepSpeed makes its fp32 masters from the bf16 weights; tunelab sets them to the fp32 weights
    loaded, so updates smaller than bf16's step still add up from the true weights (the loss after 6
    steps of SmolLM2 was 1.79 from the roundings, 1.77 so). At a learning rate of 1e-7 the weights
    saved after 3 steps are the loaded ones, not their bf16 roundings."""
    from safetensors.torch import load_file

    _, two = write_configs(tiny_config, tmp_path, method="full", learning_rate=1e-7, weight_decay=0.0)
    in_bf16(two)
    proc = accelerate_launch(launch_yaml(strategy), two)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = load_file(tiny_model_dir / "model.safetensors")
    saved = load_file(run_losses(tmp_path / "runs", "two")[0] / "final" / "model.safetensors")
    matrices = [k for k, v in loaded.items() if v.dim() == 2 and k in saved]
    assert matrices and all(not torch.equal(loaded[k], loaded[k].bfloat16().float()) for k in matrices)
    for key in matrices:
        torch.testing.assert_close(saved[key], loaded[key], rtol=0, atol=1e-6)


def check_same_final_weights(tmp_path, weights: str) -> None:
    from safetensors.torch import load_file

    run_one, run_two = both_runs(tmp_path)
    w_one, w_two = (load_file(run / "final" / weights) for run in (run_one, run_two))
    assert w_one.keys() == w_two.keys()
    for key, value in w_one.items():
        torch.testing.assert_close(w_two[key], value, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strategy", ["fsdp", "zero2", "zero3"])
def test_qlora_on_two_cpu_processes_matches_one_process(tiny_config, tiny64_dir, tmp_path, strategy):
    """QLoRA under FSDP and DeepSpeed: the 4-bit base is whole on every process under FSDP2 (it
    leaves bitsandbytes' 4-bit weights unsharded) and ZeRO-2, partitioned under ZeRO-3 (transformers
    refuses a device_map there, so tunelab loads it without); the adapters train as one process's
    with the doubled accumulation, and validation (forwards outside training, where bitsandbytes
    would repack the weights that ZeRO-3 holds partitioned) gives one process's losses."""
    pytest.importorskip("bitsandbytes")
    config = {**tiny_config, "model": {**tiny_config["model"], "ref": str(tiny64_dir)}}  # fp32: exact
    one, two = write_configs(config, tmp_path, method="qlora", val_fraction=0.25)
    subprocess.run([sys.executable, "-m", "tunelab", "train", str(one), "--quiet"], check=True)
    check_same_as_one_process(tmp_path, accelerate_launch(launch_yaml(strategy), two))
    check_same_final_weights(tmp_path, "adapter_model.safetensors")
    val_one, val_two = (validation_losses(run) for run in both_runs(tmp_path))
    assert len(val_one) == 2 and val_two == pytest.approx(val_one, rel=1e-5)  # before and after training


def test_fsdp_validation_with_a_share_one_short_matches_one_process(tiny_config, tmp_path):
    """Validation splits its micro batches between the processes; under FSDP every forward is a
    collective, so the process with one fewer runs one more, left out of the loss (it hung before)."""
    # 5 of the 12 rows: 3 micro batches of 2, one process gets 1
    one, two = write_configs(tiny_config, tmp_path, val_fraction=0.4)
    subprocess.run([sys.executable, "-m", "tunelab", "train", str(one), "--quiet"], check=True)
    proc = accelerate_launch(FSDP_YAML, two)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "7 train / 5 validation" in " ".join(proc.stdout.split()), proc.stdout[-2000:]
    val_one, val_two = (validation_losses(run) for run in both_runs(tmp_path))
    assert len(val_one) == 2 and val_two == pytest.approx(val_one, rel=1e-5)  # before and after training


@pytest.mark.parametrize("strategy, dtype", [("ddp", "fp32"), ("fsdp", "fp32"), ("zero2", "fp32"), ("zero3", "fp32"),
                                             ("zero2", "bf16"), ("zero3", "bf16")])
def test_a_run_resumed_under_the_launcher_ends_as_one_never_interrupted(tiny_config, tmp_path, strategy, dtype):
    """Checkpoints under DDP hold the whole AdamW state, under FSDP and DeepSpeed each process's
    shard of it, so a run resumed under the same launcher ends with exactly the weights of one never
    interrupted (under ZeRO-3 loaded into a model transformers loaded partitioned; in DeepSpeed's
    bf16 mode the checkpoint's fp32 weights become its masters again, not their bf16 roundings).
    Sharded, one process resuming it starts the moments from zero (the shards were cut for two),
    and says so."""
    from safetensors.torch import load_file

    launch = launch_yaml(strategy)
    _, two = write_configs(tiny_config, tmp_path, method="full", learning_rate=1e-3, save_every_n_steps=1)
    if dtype == "bf16":
        in_bf16(two)
    assert accelerate_launch(launch, two).returncode == 0
    run, losses = run_losses(tmp_path / "runs", "two")
    step2 = run / "checkpoints" / "step-000002"
    saved = ["optimizer.pt"] if strategy == "ddp" else ["optimizer-rank0.pt", "optimizer-rank1.pt"]
    assert sorted(p.name for p in step2.glob("optimizer*")) == saved
    assert not list((run / "checkpoints").glob(".*"))  # the shards' staging folders were moved in
    uninterrupted = load_file(run / "final" / "model.safetensors")

    def resume(*launcher: str) -> subprocess.CompletedProcess:
        shutil.rmtree(run / "final")  # the last step is no checkpoint: a resume starts from step 2
        return subprocess.run([*launcher, "-m", "tunelab", "train", str(run / "config.yaml"), "--resume"],
                              capture_output=True, text=True, timeout=600)

    proc = resume(sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch))
    assert proc.returncode == 0 and "resumed from" in proc.stdout and "moments start again" not in proc.stdout
    assert run_losses(tmp_path / "runs", "two")[1] == losses
    resumed = load_file(run / "final" / "model.safetensors")
    assert all(torch.equal(resumed[k], v) for k, v in uninterrupted.items())
    if strategy != "ddp":
        proc = resume(sys.executable)  # one process
        assert proc.returncode == 0 and "moments start again from zero" in " ".join(proc.stdout.split())


def test_stepping_in_backward_under_ddp_is_refused(tiny_config, tmp_path):
    """Each weight would be stepped with its own process's gradient, before DDP averages it."""
    _, two = write_configs(tiny_config, tmp_path, method="full", optimizer_in_backward=True, max_grad_norm=0.0,
                            learning_rate=1e-3)
    proc = torchrun_two(two)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "train.optimizer_in_backward=true under ddp with 2 process(es)" in output, output[-3000:]


def test_sharding_on_cpus_refuses_what_it_cannot_switch_on(monkeypatch):
    """On CPUs accelerate runs an FSDP or DeepSpeed launch as DDP; tunelab switches them on, but
    FSDP1 cannot be there (it wants GPUs), nor DeepSpeed where it is not installed: both refused,
    saying what to do, rather than quietly run as DDP."""
    from types import SimpleNamespace

    import accelerate.utils
    from accelerate.utils import DistributedType

    from tunelab.errors import RunError
    from tunelab.training.distributed import sharding_on_cpus

    def accelerator():
        return SimpleNamespace(state=SimpleNamespace(distributed_type=DistributedType.MULTI_CPU), is_main_process=True)

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(RunError, match="fsdp_version: 2"):
        sharding_on_cpus(accelerator())
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setattr(accelerate.utils, "is_deepspeed_available", lambda: False)
    a = accelerator()
    with pytest.raises(RunError, match="pip install deepspeed"):
        sharding_on_cpus(a)
    assert a.state.distributed_type == DistributedType.MULTI_CPU


@pytest.mark.parametrize("strategy, method, gather", [
    ("ddp", "lora", True), ("fsdp", "lora", True), ("fsdp", "full", True), ("fsdp", "lora", False),
    ("zero3", "full", True), ("zero3", "lora", True), ("zero3", "full", False)])
def test_generation_evaluation_during_training_answers_as_one_process(tiny_config, tmp_path, strategy, method,
                                                                      gather):
    """`eval.data` under the launcher: each process answers its share of the prompts (5 prompts: 3
    and 2) and the main one writes every answer, in order: the same answers and scores as one
    process's, every 2 steps and after training, and training goes on after it as one process's.
    Under FSDP and ZeRO-3 the weights are gathered for it (else the shares of 3 and 2 would hang:
    each forward on sharded weights needs both processes); with `eval.gather_weights: false` the
    process with 2 repeats one and generation keeps their token steps together."""
    from tunelab.evaluation.runner import load_items

    sentiment = Path(tiny_config["data"]["train"])
    lr = {"learning_rate": 1e-3} if method == "full" else {}
    one, two = write_configs(tiny_config, tmp_path, method=method, **lr)
    for config in (one, two):
        cfg = yaml.safe_load(config.read_text())
        cfg["eval"] = {"data": str(sentiment), "every_n_steps": 2, "limit": 5, "max_new_tokens": 6, "batch_size": 1,
                       "labels": ["positive", "negative"], "gather_weights": gather}
        config.write_text(yaml.safe_dump(cfg))
    subprocess.run([sys.executable, "-m", "tunelab", "train", str(one), "--quiet"], check=True)
    proc = accelerate_launch(launch_yaml(strategy), two)
    check_same_as_one_process(tmp_path, proc, weights=weights_file(method))
    run_one, run_two = both_runs(tmp_path)
    evals_one, evals_two = ([r for r in read_metrics(run) if "eval_n" in r] for run in (run_one, run_two))
    assert [r["step"] for r in evals_two] == [2, 3] and evals_two == evals_one
    prompts = [it["messages"][-1]["content"] for it in load_items(sentiment, 5)]
    for step in (2, 3):
        answers_one, answers_two = ((run / "eval" / "training" / f"step-{step}.jsonl").read_text().splitlines()
                                    for run in (run_one, run_two))
        assert [json.loads(a)["prompt"] for a in answers_two] == prompts
        assert answers_two == answers_one
