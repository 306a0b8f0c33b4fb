"""The output folder of an evaluation, written atomically (a temp folder renamed when complete):

  predictions.jsonl   one line per item: prompt, reference, answer, scores / label, flags
  metrics.json        headline metrics with bootstrap 95% CIs, lengths, flag counts, settings
  report.md           tables, flagged examples, plots (PNG files beside it)
  report.html         the same, one self-contained file (plots embedded as base64)

A report is a list of blocks rendered twice (Markdown and HTML), so both always agree.
"""

import base64
import html
import io
import json
from pathlib import Path

from tunelab.evaluation.flags import FLAGS
from tunelab.runs import atomic_dir

# blocks: ("h1"|"h2"|"p"|"pre", text) | ("table", header, rows) | ("img", filename, png_bytes, alt)


def fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def ci(v) -> str:
    return f"[{v[0]:.4f}, {v[1]:.4f}]" if v else "n/a"


def cell(text, limit: int = 300) -> str:
    text = str(text if text is not None else "").replace("\n", " ")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def render_md(blocks) -> str:
    out = []
    for b in blocks:
        if b[0] == "h1":
            out.append(f"# {b[1]}\n")
        elif b[0] == "h2":
            out.append(f"## {b[1]}\n")
        elif b[0] == "p":
            out.append(f"{b[1]}\n")
        elif b[0] == "pre":
            out.append(f"```text\n{b[1]}\n```\n")
        elif b[0] == "table":
            esc = [[cell(c).replace("|", "\\|") for c in row] for row in [b[1], *b[2]]]
            out.append("\n".join(["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(b[1])]
                                 + ["| " + " | ".join(r) + " |" for r in esc[1:]]) + "\n")
        elif b[0] == "img":
            out.append(f"![{b[3]}]({b[1]})\n")
    return "\n".join(out)


def render_html(blocks, title: str) -> str:
    body = []
    for b in blocks:
        if b[0] in ("h1", "h2", "p", "pre"):
            body.append(f"<{b[0]}>{html.escape(str(b[1]))}</{b[0]}>")
        elif b[0] == "table":
            head = "".join(f"<th>{html.escape(cell(c))}</th>" for c in b[1])
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(cell(c))}</td>" for c in r) + "</tr>" for r in b[2])
            body.append(f"<table><tr>{head}</tr>{rows}</table>")
        elif b[0] == "img":
            data = base64.b64encode(b[2]).decode()
            body.append(f'<img alt="{html.escape(b[3])}" src="data:image/png;base64,{data}">')
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
             "vertical-align:top;font-size:14px}th{background:#f3f3f3}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion_plot(cm: dict) -> bytes:
    plt = pyplot()
    counts = cm["counts"]
    fig, ax = plt.subplots(figsize=(1.2 * len(cm["columns_predicted"]) + 2, 0.9 * len(counts) + 1.8))
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(len(cm["columns_predicted"])), cm["columns_predicted"], rotation=30, ha="right")
    ax.set_yticks(range(len(counts)), cm["rows_reference"])
    top = max(max(r) for r in counts) or 1
    for i, row in enumerate(counts):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference")
    ax.set_title("confusion matrix")
    return png(fig)


def length_plot(preds: list[dict]) -> bytes:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ans = [len(p["answer"].split()) for p in preds]
    refs = [len(p["reference"].split()) for p in preds if p.get("reference") is not None]
    bins = max(5, min(30, len(set(ans + refs))))
    ax.hist([ans, refs] if refs else [ans], bins=bins, label=["answer", "reference"][: 2 if refs else 1])
    ax.set_xlabel("words")
    ax.set_ylabel("items")
    ax.set_title("answer length")
    ax.legend()
    return png(fig)


def flag_blocks(preds: list[dict], per_flag: int = 3) -> list:
    counts = {f: [p for p in preds if f in p.get("flags", {})] for f in FLAGS}
    blocks = [("h2", "Error analysis"),
              ("p", "Rules: empty; cut off at max_new_tokens; too long (> 2x the reference's words and 10+ more); "
                    "repetitive (a 3-gram 3+ times); misspelled (not in pyspellchecker's dictionary, prompt or "
                    "reference)."),
              ("table", ["flag", "items", "share"],
               [[f, len(v), f"{len(v) / max(len(preds), 1):.1%}"] for f, v in counts.items()])]
    rows = [[f, p["id"], p["answer"], json.dumps(p["flags"][f]) if not isinstance(p["flags"][f], bool) else ""]
            for f, v in counts.items() for p in v[:per_flag]]
    if rows:
        blocks.append(("table", ["flag", "item", "answer", "detail"], rows))
    return blocks


def eval_blocks(r) -> tuple[list, dict]:
    """Report blocks and {filename: png} for one evaluation."""
    m, preds = r.metrics, r.predictions
    hm, cis = m["metrics"], m["metrics"].get("ci95", {})
    blocks = [("h1", f"Evaluation: {m['name']}"),
              ("p", f"Model `{m['model']}` on `{m['data']}`: {m['n']} items, {m['seconds']} s "
                    f"({m['items_per_s']} items/s). 95% CIs: bootstrap over items (1000 resamples).")]
    images = {}
    if m["kind"] == "labels":
        blocks += [("table", ["metric", "value", "95% CI"],
                    [["accuracy", fmt(hm["accuracy"]), ci(cis.get("accuracy"))], ["macro-F1", fmt(hm["macro_f1"]), ""],
                     ["Cohen's kappa", fmt(hm["cohen_kappa"]), ""],
                     ["Krippendorff's alpha (nominal)", fmt(hm["krippendorff_alpha"]), ""],
                     ["unparseable answers", f"{hm['unparseable']} ({hm['unparseable_rate']:.1%})", ""]]),
                   ("p", "Unparseable answers count as wrong and as their own category in kappa and alpha."),
                   ("table", ["label", "precision", "recall", "F1", "support"],
                    [[k, fmt(v["precision"]), fmt(v["recall"]), fmt(v["f1"]), v["support"]]
                     for k, v in hm["per_class"].items()])]
        images["confusion_matrix.png"] = confusion_plot(hm["confusion_matrix"])
    else:
        rows = [[k, fmt(v), ci(cis.get(k))] for k, v in hm.items() if k != "ci95" and isinstance(v, (int, float))]
        blocks.append(("table", ["metric", "value", "95% CI"], rows))
    if m["kind"] != "task":
        la, lr = m["lengths"]["answer"], m["lengths"].get("reference") or {}
        blocks += [("h2", "Answer length"),
                   ("table", ["", *la], [["answer", *la.values()], ["reference", *[lr.get(k, "") for k in la]]])]
        images["lengths.png"] = length_plot(preds)
        blocks += flag_blocks(preds)
    for fname, data in images.items():
        blocks.append(("img", fname, data, fname[:-4]))
    wrong = [p for p in preds if p.get("correct") is False]
    shown = (wrong + [p for p in preds if p not in wrong])[:15] if m["kind"] == "labels" else preds[:15]
    blocks += [("h2", "Examples" + (" (errors first)" if m["kind"] == "labels" else "")),
               ("table", ["item", "prompt", "reference", "answer"],
                [[p.get("id"), p.get("prompt", ""), p.get("reference", ""), p.get("answer", p.get("pred", ""))]
                 for p in shown])]
    return blocks, images


def write_folder(out: Path, blocks: list, images: dict, files: dict[str, str], title: str) -> Path:
    """Write files + images + report.md/.html into `out` atomically."""
    with atomic_dir(out) as tmp:
        for fname, text in files.items():
            (tmp / fname).write_text(text)
        for fname, data in images.items():
            (tmp / fname).write_bytes(data)
        (tmp / "report.md").write_text(render_md(blocks))
        (tmp / "report.html").write_text(render_html(blocks, title))
    return out


def write_eval(out: Path, r, extra_files: dict | None = None) -> Path:
    blocks, images = eval_blocks(r)
    files = {"predictions.jsonl": "".join(json.dumps(p, ensure_ascii=False, default=str) + "\n" for p in r.predictions),
             "metrics.json": json.dumps(r.metrics, indent=2, default=str) + "\n", **(extra_files or {})}
    return write_folder(Path(out), blocks, images, files, f"tunelab eval {r.metrics['name']}")
