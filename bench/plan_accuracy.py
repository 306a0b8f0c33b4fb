"""Is `tunelab plan` right? Real short training jobs here, predicted against measured peak memory.

Each job runs `tunelab.train` in its own process (peak RSS is per process, ru_maxrss) on data whose
every example is longer than max_seq_len, so every micro batch is as large as the plan assumes
(micro_batch_size * max_seq_len tokens, answers only). Rows: a tiny random Llama and SmolLM2-135M;
full, LoRA and (when this tunelab has it) QLoRA; two max_seq_len values. Target: within +-15%.

usage: python bench/plan_accuracy.py [--steps 3] [--only smollm2|tiny] [--methods full,lora] [--seqs 256,1024]
                                    [--optimizer adamw|adamw_8bit] [--weight-dtype fp32|bf16]
                                    [--optimizer-in-backward] [--json out.json]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = ROOT / "examples" / "data" / "alpaca_en_demo.json"


def long_rows(n: int = 48) -> list[dict]:
    """Alpaca rows whose answers are several demo answers joined: all longer than 1024 tokens."""
    rows = json.loads(DATA.read_text())
    out = []
    for i in range(n):
        parts = [rows[(i * 17 + k) % len(rows)]["output"] for k in range(12)]
        out.append({"instruction": rows[i]["instruction"], "input": "", "output": "\n\n".join(parts)})
    return out


def tiny_model(folder: Path) -> Path:
    """A 4-layer random Llama (hidden 256) on SmolLM2's tokenizer (the tests' recipe, a bit larger)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_tiny_model

    if not (folder / "config.json").exists():
        make_tiny_model(folder, layers=4, hidden=256)
    return folder


def worker(spec: dict) -> None:
    import resource

    import tunelab
    import tunelab.training  # noqa: F401  (the loop's imports: torch, transformers, peft, accelerate)
    from tunelab.hardware import peak_rss_mb

    import accelerate  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    after_import = peak_rss_mb()
    cfg = {"name": "plan", "output_dir": spec["out"], "method": spec["method"], "seed": 0,
           "model": {"ref": spec["model"], "dtype": "auto"},
           "data": {"train": spec["data"], "format": "alpaca", "val_fraction": 0, "max_seq_len": spec["seq"]},
           "lora": {"rank": 16, "alpha": 32, "dropout": spec.get("dropout", 0.0), "target_modules": "all-linear"},
           "train": {"max_steps": spec["steps"], "micro_batch_size": spec["mbs"], "grad_accum_steps": 1,
                     "learning_rate": 2e-4 if spec["method"] != "full" else 2e-5, "warmup_steps": 0,
                     "eval_every_n_steps": 0, "save_every_n_steps": 0, "compile": spec.get("compile", False),
                     "gradient_checkpointing": spec.get("gc", False), "optimizer": spec.get("optimizer", "adamw"),
                     "weight_dtype": spec.get("weight_dtype", "fp32") if spec["method"] == "full" else "fp32",
                     "optimizer_in_backward": spec.get("in_backward", False),
                     "max_grad_norm": 0.0 if spec.get("in_backward") else 1.0}}
    t0 = time.time()
    tunelab.train(cfg, quiet=True, force=True)
    print(json.dumps({"peak_rss_mb": peak_rss_mb(), "after_import_mb": after_import,
                      "seconds": time.time() - t0,
                      "children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))


def measure(spec: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(lines[-1])


def has_qlora() -> bool:
    sys.path.insert(0, str(ROOT / "src"))
    from tunelab.config.load import METHODS

    return "qlora" in METHODS


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--only", default=None, choices=["tiny", "smollm2"])
    p.add_argument("--methods", default=None, help="comma list, default full,lora(,qlora)")
    p.add_argument("--seqs", default="256,1024")
    p.add_argument("--mbs", type=int, default=2)
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw_8bit"])
    p.add_argument("--weight-dtype", default="fp32", choices=["fp32", "bf16"], help="full fine-tuning's weights")
    p.add_argument("--optimizer-in-backward", action="store_true", help="train.optimizer_in_backward (no clipping)")
    p.add_argument("--compile", action="store_true", help="compiled runs (train.compile true): what the plan's "
                   "compiled terms are for")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(json.loads(a.worker))

    sys.path.insert(0, str(ROOT / "src"))
    import tunelab

    work = Path(tempfile.mkdtemp(prefix="plan_accuracy_"))
    data = work / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in long_rows()))
    models = {"tiny": str(tiny_model(work / "tiny")), "smollm2": "smollm2-135m-instruct"}
    if a.only:
        models = {a.only: models[a.only]}
    methods = a.methods.split(",") if a.methods else ["full", "lora"] + (["qlora"] if has_qlora() else [])
    jobs = [(name, ref, method, seq, a.mbs, {}) for name, ref in models.items() for method in methods
            for seq in [int(x) for x in a.seqs.split(",")]]
    if (not a.only or a.only == "smollm2") and not a.methods:  # held-out settings: not used to calibrate the planner
        smol = models.get("smollm2", "smollm2-135m-instruct")
        jobs += [("smollm2", smol, "lora", 512, 4, {"dropout": 0.05}),
                 ("smollm2", smol, "full", 1024, 2, {"gc": True})]
    rows = []
    print(f"{'model':8} {'method':6} {'seq':>5} {'mbs':>3} {'extra':12} {'predicted MB':>13} {'measured MB':>12} "
          f"{'error':>7}  s")
    for name, ref, method, seq, mbs, extra in jobs:
        spec = {"model": ref, "method": method, "seq": seq, "mbs": mbs, "steps": a.steps,
                "data": str(data), "out": str(work / "runs"), "optimizer": a.optimizer,
                "weight_dtype": a.weight_dtype, "in_backward": a.optimizer_in_backward, "compile": a.compile, **extra}
        pred = tunelab.plan(model=ref, method=method, max_seq_len=seq, micro_batch_size=mbs, grad_accum_steps=1,
                            gradient_checkpointing=extra.get("gc", False), devices=[], timing=False,
                            overrides=[f"lora.dropout={extra.get('dropout', 0.0)}", f"train.optimizer={a.optimizer}",
                                       f"train.compile={str(a.compile).lower()}",
                                       *(["train.optimizer_in_backward=true", "train.max_grad_norm=0"]
                                         if a.optimizer_in_backward else [])]
                            + ([f"method={method}", f"train.weight_dtype={a.weight_dtype}"] if method == "full" else []))
        got = measure(spec)
        tag = ",".join(f"{k}={v}" for k, v in extra.items())
        row = {"model": name, "method": method, "seq": seq, "mbs": mbs, "extra": tag,
               "predicted_mb": pred.peak_bytes / 2**20, **got}
        if "error" in got:
            print(f"{name:8} {method:6} {seq:5} {mbs:3} {tag:12} failed: {got['error'][:100]}")
        else:
            row["error_pct"] = 100 * (row["predicted_mb"] - got["peak_rss_mb"]) / got["peak_rss_mb"]
            print(f"{name:8} {method:6} {seq:5} {mbs:3} {tag:12} {row['predicted_mb']:13.0f} "
                  f"{got['peak_rss_mb']:12.0f} {row['error_pct']:+6.1f}%  {got['seconds']:.0f}", flush=True)
        rows.append(row)
    errors = [abs(r["error_pct"]) for r in rows if "error_pct" in r]
    if errors:
        print(f"\nworst |error| {max(errors):.1f}%, mean {sum(errors) / len(errors):.1f}% over {len(errors)} rows "
              f"(target: every row within 15%)")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
