"""`tunelab quickstart`: the main job end to end on the embedded model, in a few minutes on a CPU.

SmolLM2-135M-Instruct learns to label the sentiment of review sentences (UCI, CC BY 4.0; shipped
in the package). It prints the base model's answers to held-out reviews, trains a LoRA adapter,
then prints validation loss and label accuracy before and after (a paired comparison with
McNemar's test, report in <run>/eval/quickstart-compare/), and the answers side by side.
"""

from importlib.resources import files
from pathlib import Path

from tunelab.evaluation.labels import parse_label  # noqa: F401  (it lived here; kept importable)
from tunelab.log import console

LABELS = ("positive", "negative")


def quickstart_data() -> tuple[Path, Path]:
    root = files("tunelab") / "assets" / "quickstart"
    return Path(str(root / "sentiment_train.jsonl")), Path(str(root / "sentiment_test.jsonl"))


def quickstart_config(output_dir: str = "runs", max_steps: int = 60) -> dict:
    train_file, test_file = quickstart_data()
    return {
        "name": "quickstart", "output_dir": output_dir, "method": "lora", "seed": 0,
        "model": {"ref": "smollm2-135m-instruct"},
        # validation loss on the 100 reviews the label evaluation asks (the file holds 300): each pass
        # over all of them took 80 s on a CPU without bf16 (AVX2), four passes a run
        "data": {"train": str(train_file), "validation": str(test_file), "max_seq_len": 256, "val_limit": 100},
        "lora": {"rank": 16, "alpha": 32, "dropout": 0.0},
        "train": {"max_steps": max_steps, "micro_batch_size": 8, "grad_accum_steps": 1, "learning_rate": 3e-4,
                  "eval_every_n_steps": 20, "save_every_n_steps": 0, "warmup_steps": 5},
    }


def _scores(ev) -> dict:
    """The label evaluation's numbers the summary keeps (unparseable answers count as wrong)."""
    m = ev.metrics["metrics"]
    return {**{k: m[k] for k in ("accuracy", "correct", "n", "unparseable", "macro_f1", "cohen_kappa")},
            "accuracy_ci95": m["ci95"]["accuracy"]}


def quickstart(output_dir: str = "runs", max_steps: int = 60, n_eval: int = 100, n_show: int = 6) -> dict:
    """Run the quickstart; return its summary (also written to <run>/quickstart.json).

    Base against tuned is a label evaluation (accuracy, macro-F1, kappa, ...) with a paired
    comparison (McNemar, paired bootstrap) in <run>/eval/quickstart-compare/.
    """
    from tunelab.evaluation import compare, evaluate
    from tunelab.generation import SamplingConfig, read_prompts
    from tunelab.models import load_model
    from tunelab.runs import atomic_write_json, atomic_write_text
    from tunelab.training import train

    _, test_file = quickstart_data()
    items = read_prompts(test_file)[:n_eval]
    refs = [i["reference"] for i in items]

    console.rule("[bold]1. The base model answers held-out reviews")
    base, tok = load_model("smollm2-135m-instruct")
    label_eval = {"labels": list(LABELS), "limit": n_eval, "sampling": SamplingConfig(max_new_tokens=24),
                  "batch_size": 16, "write": False}
    base_eval = evaluate(base, test_file, tokenizer=tok, **label_eval)
    base_answers = [p["answer"] for p in base_eval.predictions]
    base_acc = _scores(base_eval)
    del base
    console.print(f"base model accuracy on {base_acc['n']} held-out reviews: {base_acc['accuracy']:.1%} "
                  f"({base_acc['unparseable']} answers name no label)")

    console.rule(f"[bold]2. Fine-tune with LoRA ({max_steps} steps)")
    result = train(quickstart_config(output_dir, max_steps))

    console.rule("[bold]3. The tuned model answers the same reviews")
    tuned, tok = load_model(str(result.run_dir))
    tuned_eval = evaluate(tuned, test_file, tokenizer=tok, **label_eval)
    tuned_answers = [p["answer"] for p in tuned_eval.predictions]
    tuned_acc = _scores(tuned_eval)
    base_eval.metrics["model"], tuned_eval.metrics["model"] = "smollm2-135m-instruct", str(result.run_dir)
    cmp = compare(base_eval, tuned_eval, out=result.run_dir / "eval" / "quickstart-compare")

    _print_side_by_side(items[:n_show], base_answers, tuned_answers)
    summary = {"run_dir": str(result.run_dir), "steps": result.steps,
               "val_loss_before": result.val_loss_before, "val_loss_after": result.val_loss_after,
               "base": base_acc, "tuned": tuned_acc, "mcnemar": cmp.summary["metrics"]["accuracy"]["mcnemar"],
               "answers": [{"review": i["messages"][-1]["content"].split("\n\n", 1)[-1], "reference": r,
                            "base": b, "tuned": t}
                           for i, r, b, t in zip(items, refs, base_answers, tuned_answers)]}
    atomic_write_json(result.run_dir / "quickstart.json", summary)
    atomic_write_text(result.run_dir / "quickstart.md", _markdown(summary))
    console.rule("[bold]Result")
    console.print(f"validation loss  {result.val_loss_before:.3f} -> {result.val_loss_after:.3f}")
    console.print(f"accuracy         {base_acc['accuracy']:.1%} -> {tuned_acc['accuracy']:.1%} "
                  f"(n={tuned_acc['n']}; unparseable {base_acc['unparseable']} -> {tuned_acc['unparseable']})")
    console.print(f"McNemar p        {summary['mcnemar']['p_value']:.2g} (base vs tuned on the same reviews; "
                  f"report: {cmp.out_dir / 'report.html'})")
    console.print(f"everything is in {result.run_dir}: config.yaml, metrics.jsonl, loss.png, final/, quickstart.md, eval/")
    console.print(f"next: tunelab chat {result.run_dir}   |   tunelab export {result.run_dir} --format merged "
                  f"--out merged/")
    console.print("base and tuned side by side in a browser: tunelab serve smollm2-135m-instruct "
                  f"--adapter tuned={result.run_dir}, then open http://127.0.0.1:8000/ and pick 'compare with: tuned'")
    return summary


def _print_side_by_side(items, base_answers, tuned_answers) -> None:
    from rich.table import Table

    t = Table(show_lines=True, header_style="bold")
    t.add_column("review (held out)", ratio=3)
    t.add_column("label")
    t.add_column("base model", ratio=2)
    t.add_column("tuned model", ratio=1)
    for item, b, tu in zip(items, base_answers, tuned_answers):
        t.add_row(item["messages"][-1]["content"].split("\n\n", 1)[-1], item["reference"], b, tu)
    console.print(t)


def _markdown(s: dict) -> str:
    lines = ["# tunelab quickstart", "", f"Run: `{s['run_dir']}`, {s['steps']} LoRA steps.", "",
             "| | base | tuned |", "|---|---|---|",
             f"| validation loss | {s['val_loss_before']:.4f} | {s['val_loss_after']:.4f} |",
             f"| accuracy (n={s['tuned']['n']}) | {s['base']['accuracy']:.1%} | {s['tuned']['accuracy']:.1%} |",
             f"| macro-F1 | {s['base']['macro_f1']:.3f} | {s['tuned']['macro_f1']:.3f} |",
             f"| Cohen's kappa | {_num(s['base']['cohen_kappa'])} | {_num(s['tuned']['cohen_kappa'])} |",
             f"| answers naming no label | {s['base']['unparseable']} | {s['tuned']['unparseable']} |", "",
             f"McNemar's exact test, base vs tuned on the same reviews: p = {s['mcnemar']['p_value']:.2g}. "
             "Full report: [eval/quickstart-compare/report.html](eval/quickstart-compare/report.html).", "",
             "![loss](loss.png)", "", "| review | label | base | tuned |", "|---|---|---|---|"]
    for a in s["answers"][:20]:
        cells = [a[k].replace("|", "\\|").replace("\n", " ") for k in ("review", "reference", "base", "tuned")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"
