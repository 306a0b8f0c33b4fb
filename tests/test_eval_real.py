"""Evaluation with the real SmolLM2-135M-Instruct on small slices of shipped data."""

import json
from pathlib import Path

import pytest

from tunelab.evaluation import evaluate
from tunelab.generation import SamplingConfig
from tunelab.recipes.quickstart import quickstart_data

pytestmark = pytest.mark.real_model
ALPACA = Path(__file__).resolve().parents[1] / "examples" / "data" / "alpaca_en_demo.json"


def test_label_eval_of_the_base_model(tmp_path):
    _, test_file = quickstart_data()
    r = evaluate("smollm2-135m-instruct", test_file, labels="positive,negative", limit=8, out=tmp_path / "ev",
                 sampling=SamplingConfig(max_new_tokens=24), batch_size=16, quiet=True)
    m = r.metrics["metrics"]
    assert r.metrics["n"] == 8 and m["per_class"]["positive"]["support"] + m["per_class"]["negative"]["support"] == 8
    # every answer is either a label or counted unparseable; the confusion matrix holds all 8
    assert sum(map(sum, m["confusion_matrix"]["counts"])) == 8
    assert sum(p["label"] is None for p in r.predictions) == m["unparseable"]
    assert m["accuracy"] == pytest.approx(m["correct"] / 8)
    assert (tmp_path / "ev" / "confusion_matrix.png").stat().st_size > 1000


def test_generation_metrics_on_instructions(tmp_path):
    r = evaluate("smollm2-135m-instruct", ALPACA, limit=3, out=tmp_path / "gen",
                 sampling=SamplingConfig(max_new_tokens=32), batch_size=3, quiet=True)
    m = json.loads((tmp_path / "gen" / "metrics.json").read_text())["metrics"]
    assert 0 < m["rouge_l"] < 1 and 0 < m["f1"] < 1  # real answers share words with the references
    assert r.metrics["flags"]["cut_off"] >= 1  # 32 tokens is shorter than most alpaca answers
    assert r.metrics["lengths"]["answer"]["words_mean"] > 5
