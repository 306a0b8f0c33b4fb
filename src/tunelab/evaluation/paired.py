"""tunelab.compare: two models on the same items, side by side, with paired tests.

For every metric: each model's value with its bootstrap 95% CI, the difference B - A with a
paired-bootstrap CI and p-value (both models resampled on the same items), and for right/wrong
metrics (accuracy, exact match) McNemar's exact test. Plus flag counts for both and the items
where their answers differ.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.evaluation import report as rp
from tunelab.evaluation.flags import FLAGS, flag_counts
from tunelab.evaluation.runner import EvalResult, default_out, evaluate, model_name
from tunelab.evaluation.stats import mcnemar, paired_bootstrap

BINARY = ("accuracy", "exact_match", "acc")


@dataclass
class CompareResult:
    out_dir: Path | None
    summary: dict
    """What compare.json holds: per-metric values, CIs, differences and p-values, flag counts."""
    a: EvalResult
    b: EvalResult


def compare(a, b, data: "str | Path | None" = None, *, metrics=None, labels=None, limit: int | None = None,
            out: "str | Path | None" = None, name: str | None = None, sampling=None, batch_size: int = 8,
            dtype: str = "auto", system_prompt: str | None = None, write: bool = True, quiet: bool = False,
            resamples: int = 1000, seed: int = 0) -> CompareResult:
    """Compare model A (e.g. the base) and model B (e.g. your run) on the same items.

    a, b: model references, or EvalResults you already have (then `data` may be omitted).
    Other arguments as in `evaluate`. Writes <out>/a/, <out>/b/ (each a full evaluation folder),
    compare.json and report.md/.html.
    """
    results = []
    for m in (a, b):
        if isinstance(m, EvalResult):
            results.append(m)
        else:
            if data is None:
                raise TunelabError("compare needs data=... (a test file) when given model references")
            results.append(evaluate(m, data, metrics=metrics, labels=labels, limit=limit, sampling=sampling,
                                    batch_size=batch_size, dtype=dtype, system_prompt=system_prompt, write=False,
                                    quiet=quiet))
    ra, rb = results
    summary = compare_results(ra, rb, resamples, seed)
    result = CompareResult(None, summary, ra, rb)
    if write:
        name = name or f"compare-{model_name(ra.metrics['model'])}-vs-{model_name(rb.metrics['model'])}-" \
                        f"{Path(str(ra.metrics['data'])).stem}"
        out = Path(out) if out else default_out(rb.metrics["model"], name)
        if not out.is_absolute() and out.parts[0] == "evals":
            out = Path("evals") / name
        result.out_dir = write_compare(out, result)
    return result


def compare_results(ra: EvalResult, rb: EvalResult, resamples: int = 1000, seed: int = 0) -> dict:
    pa, pb = ra.predictions, rb.predictions
    if [p.get("source") for p in pa] != [p.get("source") for p in pb]:
        raise TunelabError("compare: the two evaluations are not on the same items (sources differ); "
                           "evaluate both on the same file with the same --limit")
    rows = {}
    for name in [k for k in ra.item_scores if k in rb.item_scores]:
        va, vb = ra.item_scores[name], rb.item_scores[name]
        cis_a, cis_b = ra.metrics["metrics"].get("ci95", {}), rb.metrics["metrics"].get("ci95", {})
        row = {"a": _headline(ra, name), "a_ci95": cis_a.get(name), "b": _headline(rb, name),
               "b_ci95": cis_b.get(name), "paired_bootstrap": paired_bootstrap(name, va, vb, resamples, seed)}
        if name in BINARY:
            row["mcnemar"] = mcnemar(va, vb)
        rows[name] = row
    extra = {}
    for key in ("macro_f1", "cohen_kappa", "krippendorff_alpha", "unparseable"):
        if key in ra.metrics["metrics"]:
            extra[key] = {"a": ra.metrics["metrics"][key], "b": rb.metrics["metrics"].get(key)}
    primary = next((k for k in ("accuracy", "acc", "exact_match", "f1", "rouge_l") if k in rows), None)
    differ = []
    for i, (x, y) in enumerate(zip(pa, pb)):
        if x.get("answer") != y.get("answer"):
            sa = ra.item_scores[primary][i] if primary else None
            sb = rb.item_scores[primary][i] if primary else None
            differ.append({"id": i, "prompt": x.get("prompt"), "reference": x.get("reference"), "a": x.get("answer"),
                           "b": y.get("answer"), "a_score": sa, "b_score": sb})
    differ.sort(key=lambda d: -abs((d["b_score"] or 0) - (d["a_score"] or 0)))  # biggest changes first
    return {"a": ra.metrics["model"], "b": rb.metrics["model"], "data": ra.metrics["data"], "n": len(pa),
            "metrics": rows, "other": extra, "flags": {"a": flag_counts(pa), "b": flag_counts(pb)},
            "answers_differ": len(differ), "primary_metric": primary, "differing_examples": differ[:20],
            "resamples": resamples, "seed": seed}


def _headline(r: EvalResult, name: str):
    v = r.metrics["metrics"].get(name)
    return v if v is not None else sum(r.item_scores[name]) / max(len(r.item_scores[name]), 1)


def _p(v) -> str:
    return "n/a" if v is None else (f"{v:.4f}" if v >= 1e-4 else f"{v:.1e}")


def compare_plot(s: dict) -> bytes:
    plt = rp.pyplot()
    names = [k for k in s["metrics"] if k != "bleu"]  # BLEU is 0-100, the others 0-1
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2.5, 3.5))
    for k, (side, off) in enumerate((("a", -0.2), ("b", 0.2))):
        vals = [s["metrics"][n][side] for n in names]
        cis = [s["metrics"][n][f"{side}_ci95"] or [v, v] for n, v in zip(names, vals)]
        err = [[v - c[0] for v, c in zip(vals, cis)], [c[1] - v for v, c in zip(vals, cis)]]
        ax.bar([i + off for i in range(len(names))], vals, width=0.4, yerr=err, capsize=4,
               label=f"{side.upper()}: {model_name(s[side])}")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("score (95% CI)")
    ax.legend()
    return rp.png(fig)


def write_compare(out: Path, r: CompareResult) -> Path:
    s = r.summary
    blocks = [("h1", f"Compare: A = {s['a']} vs B = {s['b']}"),
              ("p", f"{s['n']} items of `{s['data']}`. Differences are B - A with a paired bootstrap "
                    f"({s['resamples']} resamples of the same items); McNemar's exact test for right/wrong metrics."),
              ("table", ["metric", "A", "A 95% CI", "B", "B 95% CI", "B - A", "95% CI", "p (paired bootstrap)",
                         "McNemar p (A only / B only right)"],
               [[k, rp.fmt(v["a"]), rp.ci(v["a_ci95"]), rp.fmt(v["b"]), rp.ci(v["b_ci95"]),
                 rp.fmt(v["paired_bootstrap"]["diff"]), rp.ci(v["paired_bootstrap"]["ci95"]),
                 _p(v["paired_bootstrap"]["p_value"]),
                 (f"{_p(v['mcnemar']['p_value'])} ({v['mcnemar']['a_right_b_wrong']} / "
                  f"{v['mcnemar']['b_right_a_wrong']})") if "mcnemar" in v else ""] for k, v in s["metrics"].items()])]
    if s["other"]:
        blocks.append(("table", ["", "A", "B"], [[k, rp.fmt(v["a"]), rp.fmt(v["b"])] for k, v in s["other"].items()]))
    blocks += [("h2", "Error flags"),
               ("table", ["flag", "A", "B"], [[f, s["flags"]["a"][f], s["flags"]["b"][f]] for f in FLAGS]),
               ("h2", f"Where the answers differ ({s['answers_differ']} of {s['n']} items; biggest score changes first)")]
    if s["differing_examples"]:
        blocks += [("table", ["item", "prompt", "reference", "A", "B", f"{s['primary_metric']} A -> B"],
                    [[d["id"], d["prompt"], d["reference"], d["a"], d["b"],
                      f"{rp.fmt(d['a_score'])} -> {rp.fmt(d['b_score'])}"] for d in s["differing_examples"][:10]])]
    images = {}
    if any(k != "bleu" for k in s["metrics"]):
        images["compare.png"] = compare_plot(s)
        blocks.append(("img", "compare.png", images["compare.png"], "A vs B"))
    from tunelab.runs import atomic_dir

    with atomic_dir(out) as tmp:
        rp.write_eval(tmp / "a", r.a)
        rp.write_eval(tmp / "b", r.b)
        (tmp / "compare.json").write_text(json.dumps(s, indent=2, default=str) + "\n")
        for fname, data in images.items():
            (tmp / fname).write_bytes(data)
        (tmp / "report.md").write_text(rp.render_md(blocks))
        (tmp / "report.html").write_text(rp.render_html(blocks, "tunelab compare"))
    return out
