"""Generation metrics: normalized exact match, token F1, ROUGE-L, BLEU, answer lengths.

Each metric gives a per-item score (so compare can bootstrap and pair items) and a headline:
the mean of the items, except BLEU, whose headline is corpus BLEU (sacrebleu) as papers report it;
its per-item values are sacrebleu's sufficient statistics, so resampling recomputes corpus BLEU.
Normalization follows SQuAD: lower case, no punctuation, no articles (a/an/the), single spaces.
"""

import re
import string
from collections import Counter
from statistics import mean, median

from tunelab.errors import TunelabError

METRICS = ("exact_match", "f1", "rouge_l", "bleu")
_PUNCT = set(string.punctuation)


def normalize(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    p, r = normalize(prediction).split(), normalize(reference).split()
    if not p or not r:
        return float(p == r)  # both empty: a match; one empty: nothing in common
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def rouge_l(predictions: list[str], references: list[str]) -> list[float]:
    """ROUGE-L F-measure per item (Google's rouge-score, with its Porter stemmer)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]


def bleu_stats(predictions: list[str], references: list[str]) -> list[list[int]]:
    """sacrebleu's per-sentence sufficient statistics (matches and totals per n-gram order, lengths)."""
    from sacrebleu.metrics import BLEU

    return [list(map(int, s)) for s in BLEU()._extract_corpus_statistics(predictions, [references])]


def bleu_from_stats(stats: list[list[int]]) -> float:
    """Corpus BLEU (0-100) of the items whose statistics are given."""
    from sacrebleu.metrics import BLEU

    if not stats:
        return 0.0
    return float(BLEU()._compute_score_from_stats([sum(col) for col in zip(*stats)]).score)


def check_metrics(names: list[str]) -> list[str]:
    bad = [n for n in names if n not in METRICS]
    if bad:
        raise TunelabError(f"unknown metric(s) {', '.join(bad)}; choose from {', '.join(METRICS)}")
    return list(names)


def item_scores(predictions: list[str], references: list[str], names=METRICS) -> dict[str, list]:
    """{metric: per-item values}; BLEU's values are statistics, see bleu_from_stats."""
    out: dict[str, list] = {}
    for name in check_metrics(list(names)):
        if name == "exact_match":
            out[name] = [exact_match(p, r) for p, r in zip(predictions, references)]
        elif name == "f1":
            out[name] = [token_f1(p, r) for p, r in zip(predictions, references)]
        elif name == "rouge_l":
            out[name] = rouge_l(predictions, references)
        elif name == "bleu":
            out[name] = bleu_stats(predictions, references)
    return out


def aggregate(name: str, values: list) -> float:
    """The headline of a metric from per-item values (a subset of them, when bootstrapping)."""
    if name == "bleu":
        return bleu_from_stats(values)
    return float(mean(values)) if values else 0.0


def length_stats(texts: list[str]) -> dict:
    """Answer length in words and characters: mean, median, 90th percentile, max."""
    words = sorted(len(t.split()) for t in texts)
    if not words:
        return {}
    p90 = words[min(len(words) - 1, int(0.9 * len(words)))]
    return {"words_mean": round(mean(words), 2), "words_median": median(words), "words_p90": p90,
            "words_max": words[-1], "chars_mean": round(mean(len(t) for t in texts), 1)}
