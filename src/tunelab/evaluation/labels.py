"""Label tasks (stance, sentiment, any fixed label set): answer -> label, and agreement metrics.

An answer that names no label is "unparseable". It is never dropped: it counts as wrong for
accuracy, as its own predicted category in the confusion matrix, Cohen's kappa and
Krippendorff's alpha (a coder who gave a non-answer disagrees with the reference), and it is
reported as a count and a rate.
"""

import re

from tunelab.errors import TunelabError

UNPARSEABLE = "(unparseable)"


def parse_label(answer: str, labels=("positive", "negative"), window: int = 3) -> str | None:
    """The first label named within the first `window` words of the answer, or None.

    Case and punctuation are ignored; multi-word labels ("not hateful") match whole, longest
    first. "Positive." -> positive; "The answer is: favor" -> None with window 3 (a sentence
    that only gets to the label later is the model not following the format).
    """
    words = re.findall(r"[a-z0-9_]+", answer.lower())
    options = sorted(((re.findall(r"[a-z0-9_]+", lab.lower()), lab) for lab in labels), key=lambda x: -len(x[0]))
    for i in range(min(window, len(words))):
        for parts, lab in options:
            if parts and words[i:i + len(parts)] == parts:
                return lab
    return None


def check_labels(labels: list[str]) -> list[str]:
    labels = [lab.strip() for lab in labels if lab.strip()]
    if len(labels) < 2:
        raise TunelabError(f"--labels needs at least two labels, got {labels!r}; e.g. --labels none,against,favor")
    if len(set(labels)) != len(labels):
        raise TunelabError(f"--labels has duplicates: {labels!r}")
    return labels


def label_metrics(predicted: list[str | None], references: list[str], labels: list[str]) -> dict:
    """Accuracy, macro-F1, per-class P/R/F1, confusion matrix, Cohen's kappa, Krippendorff's alpha."""
    from sklearn.metrics import cohen_kappa_score, confusion_matrix, precision_recall_fscore_support

    unknown = sorted({r for r in references if r not in labels})
    if unknown:
        raise TunelabError(f"reference label(s) {unknown!r} are not in --labels {labels!r}; add them or fix the data")
    pred = [p if p is not None else UNPARSEABLE for p in predicted]
    n = len(references)
    correct = sum(p == r for p, r in zip(pred, references))
    p, r, f, support = precision_recall_fscore_support(references, pred, labels=labels, zero_division=0)
    columns = labels + [UNPARSEABLE]
    matrix = confusion_matrix(references, pred, labels=columns)[: len(labels)].tolist()  # rows: reference
    return {
        "n": n, "accuracy": correct / n if n else 0.0, "correct": correct,
        "macro_f1": float(sum(f) / len(labels)),
        "unparseable": pred.count(UNPARSEABLE), "unparseable_rate": pred.count(UNPARSEABLE) / n if n else 0.0,
        "cohen_kappa": _safe(lambda: float(cohen_kappa_score(references, pred, labels=columns))),
        "krippendorff_alpha": krippendorff_alpha([references, pred]),
        "per_class": {lab: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                            "support": int(support[i])} for i, lab in enumerate(labels)},
        "confusion_matrix": {"rows_reference": labels, "columns_predicted": columns, "counts": matrix},
    }


def krippendorff_alpha(coders: list[list[str | None]]) -> float | None:
    """Nominal Krippendorff's alpha for coders x items (None = missing), via the krippendorff package."""
    import numpy as np

    try:
        import krippendorff
    except ImportError:
        raise TunelabError("Krippendorff's alpha needs the krippendorff package: pip install krippendorff") from None
    values = sorted({v for row in coders for v in row if v is not None})
    if len(values) < 2:
        return None  # alpha is undefined when every unit gets the same value
    code = {v: i for i, v in enumerate(values)}
    data = np.array([[code[v] if v is not None else np.nan for v in row] for row in coders], dtype=float)
    return float(krippendorff.alpha(reliability_data=data, level_of_measurement="nominal"))


def _safe(fn):
    """kappa is undefined (nan, with a warning) when both sides use one category: report None."""
    import math
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        v = fn()
    return None if v is None or math.isnan(v) else v
