"""tunelab.learning_curve: how much data does the task need? Train on nested subsets, evaluate each.

The training rows are shuffled once with the seed and written to <out>/train_order.jsonl; the
run for fraction f trains on its first round(f * N) training examples (`data.limit`), so every
smaller subset is contained in every larger one and the validation split is the same for all.
The training schedule is the config's: with `train.max_steps` every run takes the same steps,
with `train.epochs` smaller subsets take fewer steps.
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.evaluation import report as rp
from tunelab.runs import atomic_write_json, atomic_write_text


@dataclass
class CurveResult:
    out_dir: Path
    metric: str
    points: list[dict]
    """One per fraction: fraction, examples, run_dir, eval_dir, value, ci95, metrics."""


def _overrides_list(overrides) -> list[str]:
    if not overrides:
        return []
    if isinstance(overrides, dict):
        return [f"{k}={v}" for k, v in overrides.items()]
    return list(overrides)


def learning_curve(config, data: "str | Path", fractions=(0.1, 0.25, 0.5, 1.0), *, overrides=None,
                   metrics=None, labels=None, metric: str | None = None, limit: int | None = None,
                   out: "str | Path | None" = None, sampling=None, batch_size: int = 8,
                   quiet: bool = True) -> CurveResult:
    """Train one run per fraction of the training data (nested subsets) and evaluate each on `data`.

    Args:
        config: a training config (YAML path, dict or RunConfig), as for `train`.
        data: the test file every run is evaluated on.
        fractions: shares of the training examples, each in (0, 1].
        metric: the metric to plot (default: accuracy with labels, else f1 or the first metric).
        limit: evaluate on the first N test items only.
    Writes <out>/train_order.jsonl, runs/, eval-<n>/ per run, curve.json, curve.png, report.md/.html.
    """
    from tunelab.config import load_config
    from tunelab.data.formats import load_examples
    from tunelab.data.read import read_records
    from tunelab.data.split import split_examples
    from tunelab.evaluation.runner import evaluate
    from tunelab.training import train

    fractions = sorted(float(f) for f in fractions)
    if not fractions or fractions[0] <= 0 or fractions[-1] > 1:
        raise TunelabError(f"--fractions {fractions}: each must be in (0, 1], e.g. 0.1,0.25,0.5,1")
    user = _overrides_list(overrides)
    cfg = load_config(config, user)
    name = cfg.name or (Path(config).stem if isinstance(config, (str, Path)) else "run")
    out = Path(out) if out else Path("evals") / f"curve-{name}-{Path(data).stem}"
    out.mkdir(parents=True, exist_ok=True)

    rows = [r for r, _ in read_records(cfg.data.train)]
    random.Random(cfg.seed).shuffle(rows)  # the nested order: seed-fixed, so reruns give the same subsets
    order_file = out / "train_order.jsonl"
    atomic_write_text(order_file, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))
    examples, _ = load_examples(order_file, cfg.data.format, cfg.data.columns or None, cfg.data.system_prompt)
    if cfg.data.validation:
        n_train = len(examples)
    else:
        n_train = len(split_examples(examples, cfg.data.val_fraction, cfg.seed)[0])
    if cfg.data.limit:
        n_train = min(n_train, cfg.data.limit)

    points = []
    for f in fractions:
        n = max(1, round(f * n_train))
        result = train(config, user + [f"data.train={order_file}", f"data.limit={n}", f"output_dir={out / 'runs'}",
                                       f"name={name}-n{n}"], quiet=quiet)
        ev = evaluate(str(result.run_dir), data, metrics=metrics, labels=labels, limit=limit, out=out / f"eval-n{n}",
                      sampling=sampling, batch_size=batch_size, quiet=quiet)
        hm = ev.metrics["metrics"]
        metric = metric or ("accuracy" if labels else "f1" if "f1" in hm else next(k for k in hm if k != "ci95"))
        if metric not in hm:
            raise TunelabError(f"metric {metric!r} is not among the evaluation's metrics {sorted(hm)}")
        points.append({"fraction": f, "examples": n, "steps": result.steps, "run_dir": str(result.run_dir),
                       "eval_dir": str(ev.out_dir), "value": hm[metric], "ci95": hm.get("ci95", {}).get(metric),
                       "val_loss": result.val_loss_after})
    summary = {"config": str(config) if isinstance(config, (str, Path)) else name, "data": str(data),
               "metric": metric, "train_examples": n_train, "seed": cfg.seed, "points": points}
    _write(out, summary)
    return CurveResult(out, metric, points)


def curve_plot(s: dict) -> bytes:
    plt = rp.pyplot()
    pts = s["points"]
    xs, ys = [p["examples"] for p in pts], [p["value"] for p in pts]
    lo = [y - (p["ci95"] or [y, y])[0] for p, y in zip(pts, ys)]
    hi = [(p["ci95"] or [y, y])[1] - y for p, y in zip(pts, ys)]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o-", capsize=4)
    if len(xs) > 1 and xs[-1] / max(xs[0], 1) >= 10:
        ax.set_xscale("log")
    ax.set_xlabel("training examples")
    ax.set_ylabel(f"{s['metric']} (95% CI)")
    ax.set_title("learning curve")
    ax.grid(alpha=0.3)
    return rp.png(fig)


def _write(out: Path, s: dict) -> None:
    image = curve_plot(s)
    blocks = [("h1", f"Learning curve: {s['config']}"),
              ("p", f"Nested subsets of {s['train_examples']} training examples (seed {s['seed']}), each run "
                    f"evaluated on `{s['data']}`; {s['metric']} with bootstrap 95% CIs."),
              ("table", ["fraction", "examples", "steps", s["metric"], "95% CI", "val loss", "run"],
               [[p["fraction"], p["examples"], p["steps"], rp.fmt(p["value"]), rp.ci(p["ci95"]), rp.fmt(p["val_loss"]),
                 p["run_dir"]] for p in s["points"]]),
              ("img", "curve.png", image, "learning curve")]
    (out / ".curve.png.tmp").write_bytes(image)
    (out / ".curve.png.tmp").replace(out / "curve.png")
    atomic_write_json(out / "curve.json", s)
    atomic_write_text(out / "report.md", rp.render_md(blocks))
    atomic_write_text(out / "report.html", rp.render_html(blocks, "tunelab learning curve"))
