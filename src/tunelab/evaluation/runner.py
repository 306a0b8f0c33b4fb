"""tunelab.evaluate: answer a test file with a model, score the answers, write an output folder.

Three kinds of evaluation share one output folder layout (see report.py):
  generation   metrics against the reference answers (exact match, F1, ROUGE-L, BLEU)
  labels       the answer is parsed to one of a fixed label set (accuracy, kappa, alpha, ...)
  task         multiple choice by log-likelihood (tunelab.evaluation.mc)
"""

import time
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.evaluation import flags as flagging
from tunelab.evaluation.labels import check_labels, label_metrics, parse_label
from tunelab.evaluation.metrics import METRICS, aggregate, check_metrics, item_scores, length_stats
from tunelab.evaluation.stats import bootstrap_ci


@dataclass
class EvalResult:
    out_dir: Path | None
    metrics: dict
    """What metrics.json holds: headline metrics, 95% CIs, lengths, flag counts, settings."""
    predictions: list[dict]
    """One record per item, as in predictions.jsonl."""
    item_scores: dict[str, list] = field(default_factory=dict)
    """Per-item values of each metric (what compare pairs and resamples)."""


def load_items(data: "str | Path", limit: int | None = None) -> list[dict]:
    from tunelab.generation import read_prompts

    items = read_prompts(data)
    if limit is not None:
        if limit < 1:
            raise TunelabError(f"--limit {limit}: must be >= 1")
        items = items[:limit]
    return items


def model_name(ref) -> str:
    return Path(str(ref)).name if isinstance(ref, (str, Path)) else type(ref).__name__


def default_out(model_ref, name: str) -> Path:
    """<run>/eval/<name> when the model is a run directory, else evals/<model>-<name>."""
    if isinstance(model_ref, (str, Path)) and Path(model_ref).exists():
        from tunelab.models.load import run_root

        root = run_root(Path(model_ref).resolve())
        if root is not None:
            return root / "eval" / name
    return Path("evals") / f"{model_name(model_ref)}-{name}"


def score_answers(items: list[dict], answers: list[str], metrics=None, labels=None, tokenizer=None,
                  max_new_tokens: int | None = None) -> tuple[list[dict], dict, dict]:
    """(predictions, headline metrics with CIs, per-item scores) for answers to items."""
    refs = [it["reference"] for it in items]
    has_refs = all(r is not None for r in refs)
    if (metrics or labels) and not has_refs:
        missing = next(it["source"] for it in items if it["reference"] is None)
        raise TunelabError(f"{missing}: this item has no reference answer, so it cannot be scored; "
                           "give the answer in the row (e.g. alpaca 'output' or a final assistant message)")
    preds = []
    for i, (it, ans) in enumerate(zip(items, answers)):
        prompt = it["messages"][-1]["content"]
        n_tok = len(tokenizer(ans, add_special_tokens=False)["input_ids"]) if tokenizer is not None else None
        rec = {"id": i, "source": it["source"], "prompt": prompt, "reference": it["reference"], "answer": ans,
               "answer_tokens": n_tok}
        rec["flags"] = flagging.flag_answer(ans, it["reference"], prompt, n_tok, max_new_tokens)
        preds.append(rec)
    scores: dict[str, list] = {}
    headline: dict = {}
    if labels:
        parsed = [parse_label(a, labels) for a in answers]
        for rec, lab in zip(preds, parsed):
            rec["label"], rec["correct"] = lab, lab == rec["reference"]
        headline = label_metrics(parsed, refs, labels)
        scores["accuracy"] = [float(p["correct"]) for p in preds]
    elif metrics:
        scores = item_scores(answers, refs, metrics)
        for name, vals in scores.items():
            headline[name] = aggregate(name, vals)
            if name != "bleu":
                for rec, v in zip(preds, vals):
                    rec.setdefault("scores", {})[name] = round(v, 4)
    headline["ci95"] = {name: bootstrap_ci(name, vals) for name, vals in scores.items()}
    return preds, headline, scores


def evaluate(model, data: "str | Path", *, metrics: "list[str] | str | None" = None,
             labels: "list[str] | str | None" = None, task: str | None = None, limit: int | None = None,
             out: "str | Path | None" = None, name: str | None = None, tokenizer=None, sampling=None,
             batch_size: int = 8, dtype: str = "auto", system_prompt: str | None = None, num_fewshot: int | None = None,
             write: bool = True, quiet: bool = False) -> EvalResult:
    """Evaluate a model on a data file and write predictions.jsonl, metrics.json, report.md/.html.

    Args:
        model: a model reference (alias, folder, .gguf, run directory) or a loaded model (then
            pass `tokenizer` too).
        data: a test file in any training format (the answer is the reference) or {"prompt": ...} rows.
        metrics: generation metrics (exact_match, f1, rouge_l, bleu); default all of them.
        labels: a label set ("none,against,favor"): the answers are parsed to labels and scored
            as a classification (accuracy, macro-F1, per-class P/R, confusion, kappa, alpha).
        task: a multiple-choice task name (hellaswag, arc, mmlu, ...) scored by log-likelihood.
        num_fewshot: solved examples before each task item (default: the task's own, 5 for mmlu).
        dtype: "auto" is fp32 for a task (bf16 moves scores by about a point against lm-eval).
        limit: the first N items only.
        out: output folder; default <run>/eval/<name> for a run, else evals/<model>-<name>.
        sampling: SamplingConfig (default greedy; 256 new tokens, 32 for labels).
        write: False returns the result without writing anything.
    """
    from tunelab.generation import SamplingConfig, generate

    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    if isinstance(labels, str):
        labels = labels.split(",")
    labels = check_labels(labels) if labels else None
    metrics = check_metrics(metrics) if metrics else (None if labels or task else list(METRICS))
    name = name or (Path(data).stem + (f"-{task}" if task else ""))
    ref = model if isinstance(model, (str, Path)) else None
    started = time.time()
    if tokenizer is None:
        if ref is None:
            raise TunelabError("evaluate(model=<a loaded model>) needs tokenizer=... too")
        from tunelab.models import load_model

        model, tokenizer = load_model(str(ref), dtype="fp32" if task and dtype == "auto" else dtype)
    info = {"model": str(ref) if ref else model_name(model), "data": str(data), "name": name}
    if task:
        preds, headline, scores = _run_task(model, tokenizer, task, data, num_fewshot, limit, batch_size)
        info.update(kind="task", task=task, num_fewshot=headline.get("num_fewshot", num_fewshot))
    else:
        items = load_items(data, limit)
        sampling = sampling or SamplingConfig(max_new_tokens=32 if labels else 256)
        answers = generate(model, tokenizer, [it["messages"] for it in items], sampling, batch_size, system_prompt,
                           progress=not quiet)
        preds, headline, scores = score_answers(items, answers, metrics, labels, tokenizer, sampling.max_new_tokens)
        info.update(kind="labels" if labels else "generation", labels=labels, metrics_requested=metrics,
                    sampling=vars(sampling), system_prompt=system_prompt,
                    lengths={"answer": length_stats([p["answer"] for p in preds]),
                             "reference": length_stats([p["reference"] for p in preds if p["reference"] is not None])},
                    flags=flagging.flag_counts(preds))
    seconds = time.time() - started
    info.update(n=len(preds), metrics=headline, seconds=round(seconds, 2),
                items_per_s=round(len(preds) / max(seconds, 1e-9), 3))
    result = EvalResult(None, info, preds, scores)
    if write:
        from tunelab.evaluation.report import write_eval

        result.out_dir = write_eval(Path(out) if out else default_out(ref or model_name(model), name), result)
    return result


def _run_task(model, tokenizer, task, data, num_fewshot, limit, batch_size):
    from tunelab.evaluation.mc import run_task

    preds, headline = run_task(model, tokenizer, task, str(data), num_fewshot=num_fewshot, limit=limit,
                               batch_size=batch_size)
    # per-item scores, so compare() can pair two models item by item (McNemar on acc)
    keys = {"acc": "correct", "acc_norm": "correct_norm", "mc2": "mc2"}
    scores = {name: [float(p[key]) for p in preds] for name, key in keys.items() if preds and key in preds[0]}
    headline = dict(headline)
    headline.setdefault("ci95", {k: bootstrap_ci(k, v) for k, v in scores.items()})
    return preds, headline, scores


def training_eval(model, tokenizer, ecfg, step: int, answer=None) -> "tuple[dict, list[dict]] | None":
    """The generation evaluation a run does every `eval.every_n_steps`: a metrics.jsonl record and
    the predictions (as in predictions.jsonl).

    answer: what answers the prompts, `generate`'s arguments (model, tokenizer, prompts, sampling,
    batch_size); under several processes each answers its share and the main one gets them all
    (training/distributed.py), and this returns None on the others.
    """
    from tunelab.generation import SamplingConfig, generate

    items = load_items(ecfg.data, ecfg.limit)
    was_training, use_cache = model.training, getattr(model.config, "use_cache", True)
    model.eval()
    model.config.use_cache = True  # training turns the KV cache off; generation needs it to be fast
    try:
        answers = (answer or generate)(model, tokenizer, [it["messages"] for it in items],
                                       SamplingConfig(max_new_tokens=ecfg.max_new_tokens), ecfg.batch_size)
    finally:
        model.config.use_cache = use_cache
        model.train(was_training)
    if answers is None:
        return None
    metrics = ecfg.metrics or (None if ecfg.labels else list(METRICS))
    preds, headline, _ = score_answers(items, answers, metrics, ecfg.labels or None, tokenizer, ecfg.max_new_tokens)
    keys = ("accuracy", "macro_f1", "unparseable_rate") if ecfg.labels else tuple(metrics)
    return {"step": step, "eval_n": len(items), **{f"eval_{k}": headline[k] for k in keys if k in headline}}, preds
