"""Multiple-choice accuracy and speed: tunelab's scorer against lm-evaluation-harness on the same items.

Both score the same local benchmark files with the same model folder. lm-eval runs its own task
definitions (the built-in YAML of each task is `include`d; only the dataset is pointed at a local
JSONL, FACTS.md), so its prompts, tokenization and metrics are its own; the local files are only
reshaped into the Hugging Face layout those YAMLs read. Printed per task: both accuracies, their
difference in points, how many items got a different prediction, the largest per-choice
log-likelihood difference, and items/s of the scoring itself (lm-eval: time inside its
`loglikelihood`; tunelab: `run_task`, which includes tokenization), plus the load average.

    python bench/eval_vs_lmeval.py --tasks hellaswag,arc_easy --limit 200
    python bench/eval_vs_lmeval.py --tasks mmlu --limit 20 --num-fewshot 5   # 20 per subject
"""

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
BENCH = Path(os.environ.get("TUNELAB_BENCHMARKS", REPO.parent / "shared" / "data" / "benchmarks"))
if not BENCH.is_dir():
    BENCH = Path("/work/shared/data/benchmarks")
FILES = {
    "arc_easy": "arc_easy_llmfoundry.jsonl", "arc_challenge": "arc_challenge_llmfoundry.jsonl",
    "hellaswag": "hellaswag_val_1000_rubrikscube.jsonl", "mmlu": "mmlu_haechan/test",
    "truthfulqa_mc1": "truthfulqa_TruthfulQA.csv", "truthfulqa_mc2": "truthfulqa_TruthfulQA.csv",
    "piqa": "llmfoundry_piqa.jsonl", "boolq": "llmfoundry_boolq.jsonl", "winogrande": "llmfoundry_winogrande.jsonl",
}


# ---------------------------------------------------------------- local files -> lm-eval's dataset layout

def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _drop(text: str, prefix: str) -> str:
    return text[len(prefix):] if text.startswith(prefix) else text


def hf_rows(task: str, path: Path) -> list[dict]:
    """The file's rows in the Hugging Face layout that lm-eval's YAML for `task` reads."""
    if task == "hellaswag":  # the rowanz file is already that layout
        return _jsonl(path)
    if task.startswith("arc"):
        return [{"id": str(i), "question": _drop(r["query"], "Question: "),
                 "choices": {"text": r["choices"], "label": list("ABCDEFGH"[:len(r["choices"])])},
                 "answerKey": "ABCDEFGH"[r["gold"]]} for i, r in enumerate(_jsonl(path))]
    if task == "piqa":
        return [{"goal": _drop(r["query"], "Question: ").removesuffix("\n"), "sol1": r["choices"][0],
                 "sol2": r["choices"][1], "label": r["gold"]} for r in _jsonl(path)]
    if task == "boolq":  # lm-eval appends the "?" that llm-foundry already added
        out = []
        for r in _jsonl(path):
            passage, _, question = r["query"].rpartition("\nQuestion: ")
            out.append({"passage": _drop(passage, "Passage: "), "question": question.removesuffix("?"),
                        "label": r["gold"]})
        return out
    if task == "winogrande":  # contexts/continuation kept as they are: see winogrande_utils below
        return _jsonl(path)
    if task.startswith("truthfulqa"):
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = list(csv.DictReader(f))
        split = lambda s: [a.strip() for a in s.split(";") if a.strip()]  # noqa: E731
        out = []
        for r in rows:
            best, right, wrong = r["Best Answer"].strip(), split(r["Correct Answers"]), split(r["Incorrect Answers"])
            out.append({"question": r["Question"],
                        "mc1_targets": {"choices": [best] + wrong, "labels": [1] + [0] * len(wrong)},
                        "mc2_targets": {"choices": right + wrong, "labels": [1] * len(right) + [0] * len(wrong)}})
        return out
    raise ValueError(task)


def _mmlu_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        return [{"question": r["question"], "choices": [r[f"choice{i}"] for i in range(4)],
                 "answer": int(r["answer"])} for r in csv.DictReader(f)]


WINOGRANDE_UTILS = '''
def doc_to_text(doc):
    return int(doc["gold"])
def doc_to_target(doc):
    return doc["continuation"].strip()
def doc_to_choice(doc):
    return doc["context_options"]
'''


def write_lmeval_tasks(tasks: list[str], out: Path) -> list[str]:
    """Task YAMLs (built-in ones included) reading local JSONL files; returns the task names to run."""
    import lm_eval

    builtin = Path(lm_eval.__file__).parent / "tasks"
    names = []

    def write(name: str, include: Path, extra: dict, splits: dict[str, Path]):
        cfg = {"task": name, "dataset_path": "json", "dataset_name": None,
               "dataset_kwargs": {"data_files": {k: str(v) for k, v in splits.items()}},
               "test_split": "test", "validation_split": None, "training_split": None, **extra}
        # JSON values are valid YAML; the built-in task supplies prompts and metrics
        lines = [f"include: {include}"] + [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in cfg.items()]
        (out / f"{name}.yaml").write_text("\n".join(lines) + "\n")
        names.append(name)

    for task in tasks:
        name = f"local_{task}"
        if task == "mmlu":
            folder = BENCH / FILES["mmlu"]
            subjects = sorted(p.name.removesuffix("_test.csv") for p in folder.glob("*_test.csv"))
            for s in subjects:
                test, dev = out / f"mmlu_{s}_test.jsonl", out / f"mmlu_{s}_dev.jsonl"
                test.write_text("".join(json.dumps(r) + "\n" for r in _mmlu_csv(folder / f"{s}_test.csv")))
                dev.write_text("".join(json.dumps(r) + "\n" for r in _mmlu_csv(folder.parent / "dev" / f"{s}_dev.csv")))
                write(f"local_mmlu_{s}", builtin / "mmlu" / "default" / "_default_template_yaml",
                      {"fewshot_split": "dev", "description":
                       f"The following are multiple choice questions (with answers) about {s.replace('_', ' ')}.\n\n"},
                      {"test": test, "dev": dev})
            continue
        data = out / f"{task}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in hf_rows(task, BENCH / FILES[task])))
        include = {"arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
                   "hellaswag": "hellaswag/hellaswag.yaml", "piqa": "piqa/piqa.yaml",
                   "boolq": "super_glue/boolq/default.yaml", "truthfulqa_mc1": "truthfulqa/truthfulqa_mc1.yaml",
                   "truthfulqa_mc2": "truthfulqa/truthfulqa_mc2.yaml"}.get(task)
        if task == "winogrande":
            (out / "winogrande_utils.py").write_text(WINOGRANDE_UTILS)
            (out / f"{name}.yaml").write_text(
                f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
                "test_split: test\nfewshot_split: test\noutput_type: multiple_choice\n"
                "doc_to_text: !function winogrande_utils.doc_to_text\n"
                "doc_to_target: !function winogrande_utils.doc_to_target\n"
                "doc_to_choice: !function winogrande_utils.doc_to_choice\n"
                "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
            names.append(name)
            continue
        # shots drawn from the test split itself, the item excluded (lm-eval does so only when
        # fewshot_split names the test split; tunelab always does)
        write(name, builtin / include, {"fewshot_split": "test"}, {"test": data})
    return names


# ---------------------------------------------------------------- runs

def _shots(task: str, num_fewshot):
    """--num-fewshot for every task but TruthfulQA, whose prompt holds its fixed examples."""
    return None if task.startswith("truthfulqa") else num_fewshot


def run_lmeval(folder: Path, tasks: list[str], limit, num_fewshot, batch_size: int, tmp: Path):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    names = write_lmeval_tasks(tasks, tmp)
    lm = HFLM(pretrained=str(folder), dtype="float32", batch_size=batch_size, device="cpu")
    spent = {"s": 0.0}
    inner = lm.loglikelihood

    def timed(requests, *a, **k):  # only the scoring, as for ours
        t = time.perf_counter()
        try:
            return inner(requests, *a, **k)
        finally:
            spent["s"] += time.perf_counter() - t

    lm.loglikelihood = timed
    out = {}
    for task in tasks:
        mine = [n for n in names if n == f"local_{task}" or n.startswith(f"local_{task}_")]
        spent["s"] = 0.0
        res = simple_evaluate(model=lm, tasks=mine, task_manager=TaskManager(include_path=str(tmp)),
                              limit=limit, num_fewshot=_shots(task, num_fewshot), log_samples=True, bootstrap_iters=0,
                              random_seed=0, numpy_random_seed=1234, torch_random_seed=1234, fewshot_random_seed=1234)
        metric = "acc,none"
        n = sum(len(res["samples"][m]) for m in mine)
        correct = sum(res["results"][m][metric] * len(res["samples"][m]) for m in mine)
        norm = (sum(res["results"][m].get("acc_norm,none", float("nan")) * len(res["samples"][m]) for m in mine))
        lls = {}
        for m in mine:
            for s in res["samples"][m]:
                lls[(m, s["doc_id"])] = [r[0][0] for r in s["resps"]]
        out[task] = {"acc": correct / n, "acc_norm": norm / n, "n": n, "seconds": spent["s"], "lls": lls,
                     "tasks": mine}
    return out


def run_ours(ref: str, tasks: list[str], limit, num_fewshot, batch_size: int, dtype: str):
    from tunelab.evaluation.mc import run_task
    from tunelab.models import load_model

    model, tok = load_model(ref, dtype=dtype)
    out = {}
    for task in tasks:
        preds, m = run_task(model, tok, task, BENCH / FILES[task], num_fewshot=_shots(task, num_fewshot), limit=limit,
                            batch_size=batch_size, progress=False)
        out[task] = {"acc": m["acc"] if task != "truthfulqa_mc2" else m["mc2"], "acc_norm": m.get("acc_norm"),
                     "n": m["n"], "seconds": m["seconds"], "preds": preds}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default="hellaswag,arc_easy")
    ap.add_argument("--limit", type=int, default=200, help="items per task (mmlu: per subject)")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--num-fewshot", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--ours-dtype", default="fp32", help="comma list, e.g. fp32,bf16 (lm-eval runs fp32)")
    ap.add_argument("--skip-lmeval", action="store_true")
    args = ap.parse_args(argv)
    tasks = args.tasks.split(",")

    from tunelab.models.load import local_folder
    from tunelab.models.resolve import resolve_model

    folder = local_folder(resolve_model(args.model))
    theirs = {}
    if not args.skip_lmeval:
        with tempfile.TemporaryDirectory() as tmp:
            theirs = run_lmeval(folder, tasks, args.limit, args.num_fewshot, args.batch_size, Path(tmp))
    ours = {d: run_ours(str(folder), tasks, args.limit, args.num_fewshot, args.batch_size, d)
            for d in args.ours_dtype.split(",")}

    print(f"\nmodel {args.model} ({folder}), limit {args.limit}, load average {os.getloadavg()}")
    print(f"{'task':16} {'who':12} {'n':>5} {'acc':>7} {'acc_norm':>8} {'Δacc pts':>8} {'Δnorm':>6} "
          f"{'diff preds':>10} {'max |Δll|':>9} {'items/s':>8} {'speedup':>7}")
    for task in tasks:
        t = theirs.get(task)
        if t:
            print(f"{task:16} {'lm-eval':12} {t['n']:5d} {100 * t['acc']:7.2f} {100 * t['acc_norm']:8.2f} "
                  f"{'':8} {'':6} {'':10} {'':9} {t['n'] / t['seconds']:8.2f}")
        for dtype, runs in ours.items():
            o = runs[task]
            line = f"{task:16} {'tunelab ' + dtype:12} {o['n']:5d} {100 * o['acc']:7.2f} "
            line += f"{100 * o['acc_norm']:8.2f} " if o["acc_norm"] is not None else f"{'':8} "
            if t:
                diff, dll = _agreement(task, t, o)
                dn = 100 * (o["acc_norm"] - t["acc_norm"]) if o["acc_norm"] is not None else float("nan")
                line += (f"{100 * (o['acc'] - t['acc']):+8.2f} {dn:+6.2f} {diff:10d} {dll:9.4f} "
                         f"{o['n'] / o['seconds']:8.2f} {t['seconds'] / o['seconds']:6.2f}x")
            else:
                line += f"{'':8} {'':6} {'':10} {'':9} {o['n'] / o['seconds']:8.2f}"
            print(line)


def _agreement(task: str, theirs: dict, ours: dict) -> tuple[int, float]:
    """Items whose argmax differs, and the largest per-choice log-likelihood difference."""
    import numpy as np

    preds = ours["preds"]
    if task == "mmlu":  # ours are subject after subject in name order, as lm-eval's subtasks
        keys = [(m, i) for m in sorted(theirs["tasks"]) for i in range(sum(1 for k in theirs["lls"] if k[0] == m))]
    else:
        keys = [(theirs["tasks"][0], i) for i in range(len(preds))]
    diff, worst = 0, 0.0
    for p, key in zip(preds, keys):
        ll = theirs["lls"][key]
        diff += int(np.argmax(ll)) != p["pred"]
        worst = max(worst, max(abs(a - b) for a, b in zip(ll, p["loglikelihoods"])))
    return diff, worst


if __name__ == "__main__":
    main()
