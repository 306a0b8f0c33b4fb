"""Full fine-tuning on CPU processes: one process, DDP, FSDP and DeepSpeed ZeRO-2/3 (two processes
over gloo), in one run.

What FSDP and ZeRO-3 buy on CPUs: each process holds half of every weight, gradient and AdamW
moment (ZeRO-2: of the gradients and moments only), so two machines (or two NUMA sockets) can fully
fine-tune a model whose fp32 state (16 bytes a parameter) does not fit in one. Same model, data and
batch as bench/train_speed.py's full rows (SmolLM2-135M, the alpaca demo, 8 rows per optimizer step,
max_seq_len 512, compiled): one process takes micro batches of 8; two processes take 4 each. On one 2-core machine each of the two gets one core, so
the tokens/s say what the collectives cost, not what a second machine would add.

Prints tokens/s (the first step untimed), the peak RSS of each process beside the peak that
`tunelab plan` predicts for one process of the setup (what the memory check before training judges
by), and the last loss. --method lora: the same with the peers' LoRA (rank 16, all-linear).

--eval N: after training, answer the first N sentences of the quickstart's sentiment test
(`eval.data`, 16 new tokens, batches of 4) and print how long that took (each process answers its
share; under FSDP and ZeRO-3 on the whole weights, gathered for it).

--shape 360m: SmolLM2's 360M shape with random weights (see train_speed.py), where the fp32 state
(5.8 GB) outweighs what every process holds anyway (libraries, compiled code, activations).

usage: python bench/fsdp_cpu.py [--steps 10] [--shape 135m|360m] [--setups "one process,ddp,fsdp,zero2,zero3"]
                                [--method full|lora] [--eval N] [--shared ../shared]
(zero2/zero3 need `pip install deepspeed`)
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from train_speed import bench_inputs, tunelab_config  # noqa: E402

EXAMPLES = HERE.parent / "examples" / "accelerate"
SENTIMENT_TEST = HERE.parent / "src" / "tunelab" / "assets" / "quickstart" / "sentiment_test.jsonl"
LAUNCH = {"ddp": EXAMPLES / "ddp.yaml", "fsdp": EXAMPLES / "fsdp.yaml",
          "zero2": EXAMPLES / "deepspeed_zero2.yaml", "zero3": EXAMPLES / "deepspeed_zero3.yaml"}


def worker(config_path: str) -> None:
    """One process of a run: train, then print this process's figures as JSON."""
    import yaml

    import tunelab
    from tunelab.hardware import peak_rss_mb
    from tunelab.planning import launched_strategy
    from tunelab.runs import MANIFEST, read_metrics

    from accelerate.state import PartialState

    cfg = yaml.safe_load(Path(config_path).read_text())
    result = tunelab.train(cfg, quiet=True, force=True)
    rank = PartialState().process_index
    m = [r for r in read_metrics(result.run_dir) if "loss" in r] if rank == 0 else []
    timed = m[1:]
    main = {"tokens_per_s": sum(r["tokens"] for r in timed) / (m[-1]["elapsed_s"] - m[0]["elapsed_s"]),
            "last_loss": m[-1]["loss"],
            "eval_seconds": json.loads((result.run_dir / MANIFEST).read_text())["eval_seconds"]} if m else {}
    if rank == 0:  # the plan for one process of this launch, as the memory check makes it
        strategy, world = launched_strategy()
        planned = tunelab.plan(cfg, devices=[], timing=False, compiled=True, strategy=strategy, world=world)
        main["planned_mb"] = planned.peak_bytes / 2 ** 20
    print(json.dumps({"rank": rank, "peak_rss_mb": peak_rss_mb(), **main}), flush=True)


def run(setup: str, model: str, data: str, steps: int, eval_items: int = 0, method: str = "full",
        variant: str = "compile") -> dict:
    import yaml

    cfg = tunelab_config(model, data, steps, method, variant)
    if eval_items:
        cfg["eval"] = {"data": str(SENTIMENT_TEST), "labels": ["positive", "negative"], "limit": eval_items,
                       "max_new_tokens": 16, "batch_size": 4, "every_n_steps": 0}
    if setup != "one process":
        cfg["train"]["micro_batch_size"] = 4  # x 2 processes: the same 8 rows a step
    path = Path(tempfile.mkdtemp()) / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    launcher = ([sys.executable] if setup == "one process" else
                [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH[setup])])
    proc = subprocess.run([*launcher, str(Path(__file__).resolve()), "--worker", str(path)],
                          capture_output=True, text=True)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"rank"')]
    if proc.returncode != 0 or not rows:
        sys.exit(f"{setup} failed:\n{proc.stderr[-3000:]}")
    main = next(r for r in rows if r["rank"] == 0)
    return {"setup": setup, "tokens_per_s": main["tokens_per_s"], "last_loss": main["last_loss"],
            "eval_seconds": main["eval_seconds"], "planned_mb": main["planned_mb"],
            "rss": [r["peak_rss_mb"] for r in sorted(rows, key=lambda r: r["rank"])]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--shape", default="135m", choices=["135m", "360m"])
    p.add_argument("--setups", default="one process,ddp,fsdp,zero2,zero3")
    p.add_argument("--method", default="full", choices=["full", "lora"])
    p.add_argument("--variant", default="compile", choices=["compile", "eager"],
                   help="train.compile true or false (tunelab's auto leaves LoRA under ZeRO-3 eager)")
    p.add_argument("--eval", type=int, default=0, help="answer this many prompts after training, timed")
    p.add_argument("--shared", default=str(HERE.parent.parent / "shared"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a.worker)
    model, data = bench_inputs(Path(a.shared), a.shape)
    print(f"{a.method} fine-tuning, SmolLM2-{a.shape.upper()}, {a.variant}, 8 rows a step, {a.steps} steps (the first untimed)\n")
    evals = f" {f'{a.eval} answers, s':>15}" if a.eval else ""
    print(f"{'setup':14} {'tokens/s':>9} {'peak RSS MB per process':>26} {'planned MB':>11} {'last loss':>10}{evals}")
    for setup in a.setups.split(","):
        r = run(setup, str(model), str(data), a.steps, a.eval, a.method, a.variant)
        rss = " / ".join(f"{x:.0f}" for x in r["rss"])
        evals = f" {r['eval_seconds']:15.1f}" if a.eval else ""
        print(f"{r['setup']:14} {r['tokens_per_s']:9.1f} {rss:>26} {r['planned_mb']:11.0f} {r['last_loss']:10.4f}{evals}",
              flush=True)


if __name__ == "__main__":
    main()
