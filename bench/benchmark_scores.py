"""SmolLM2-135M-Instruct's scores on every shipped benchmark file, in full, with tunelab's scorer.

Each task runs `tunelab.evaluate(model, file, task=...)` (fp32, the task's own few-shot setting:
mmlu 5-shot from the dev split, the others 0-shot, as lm-eval's defaults except mmlu) and the
table gives acc, acc_norm (where lm-eval reports it), TruthfulQA's mc2, the number of items, the
95% bootstrap CI of acc, and items/s here.

    python bench/benchmark_scores.py [--model smollm2-135m-instruct] [--tasks hellaswag,arc_easy] [--limit N]
"""

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))
from eval_vs_lmeval import BENCH, FILES  # noqa: E402  (one table of task -> shipped file)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--tasks", default=",".join(FILES))
    p.add_argument("--limit", type=int, default=None, help="first N items per task (per subject for mmlu)")
    p.add_argument("--batch-size", type=int, default=16)
    a = p.parse_args(argv)

    import tunelab

    model, tok = tunelab.load_model(a.model, dtype="fp32")
    rows = []
    for task in a.tasks.split(","):
        t0 = time.time()
        r = tunelab.evaluate(model, BENCH / FILES[task], task=task, tokenizer=tok, limit=a.limit,
                             batch_size=a.batch_size, write=False)
        m = r.metrics["metrics"]
        lo, hi = m["ci95"]["acc"]
        rows.append((task, m.get("num_fewshot", r.metrics.get("num_fewshot")), m["n"], m.get("acc"),
                     m.get("acc_norm"), m.get("mc2"), f"[{100 * lo:.1f}, {100 * hi:.1f}]",
                     m["n"] / (time.time() - t0)))
        print(f"{task}: done in {time.time() - t0:.0f}s", file=sys.stderr)

    def pct(x):
        return "-" if x is None else f"{100 * x:.2f}"

    print(f"model {a.model} (fp32), load average {os.getloadavg()[0]:.1f}")
    print("| task | shots | items | acc | acc_norm | mc2 | acc 95% CI | items/s |")
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    for task, k, n, acc, accn, mc2, ci, ips in rows:
        print(f"| {task} | {k} | {n} | {pct(acc)} | {pct(accn)} | {pct(mc2)} | {ci} | {ips:.1f} |")


if __name__ == "__main__":
    main()
