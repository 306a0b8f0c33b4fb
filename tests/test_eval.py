"""Evaluation: metric values against hand-computed numbers, agreement statistics, paired tests,
ratings, error flags, and the output folders of eval / compare / judge / curve on the tiny model."""

import json
import math
import sys
from pathlib import Path

import pytest

from conftest import write_jsonl
from tunelab.errors import TunelabError
from tunelab.evaluation import labels as lb
from tunelab.evaluation import metrics as mt
from tunelab.evaluation.flags import flag_answer, misspelled_words, repeated_ngram
from tunelab.evaluation.judging import bradley_terry, elo_ratings, parse_verdict, rate
from tunelab.evaluation.stats import bootstrap_ci, mcnemar, paired_bootstrap
from tunelab.generation import SamplingConfig

# --- generation metrics ---------------------------------------------------------------------


def test_normalized_exact_match_and_token_f1():
    assert mt.normalize("The  Cat, sat!") == "cat sat"
    assert mt.exact_match("The cat sat.", "cat SAT") == 1.0
    assert mt.exact_match("cat sat down", "cat sat") == 0.0
    # "cat sat" vs "cat sat down": 2 common, P = 1, R = 2/3, F1 = 0.8
    assert mt.token_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
    assert mt.token_f1("dog", "cat") == 0.0
    assert mt.token_f1("", "") == 1.0 and mt.token_f1("", "cat") == 0.0
    # repeated tokens count once per match: "a a b" -> "a b" after articles? no: 'a' is an article
    assert mt.token_f1("x x y", "x y y") == pytest.approx(2 / 3)


def test_rouge_l_and_bleu():
    # LCS of [the cat sat on the mat] and [the cat is on the mat] = 5 of 6 words each side
    assert mt.rouge_l(["the cat sat on the mat"], ["the cat is on the mat"])[0] == pytest.approx(5 / 6)
    import sacrebleu

    hyps, refs = ["the cat sat on the mat", "hello world", "a b c d e"], ["the cat is on the mat", "hello there", "a b c d e"]
    stats = mt.bleu_stats(hyps, refs)
    assert mt.bleu_from_stats(stats) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert mt.bleu_from_stats(stats[2:]) == pytest.approx(100.0)
    scores = mt.item_scores(hyps, refs, ["exact_match", "bleu"])
    assert scores["exact_match"] == [0.0, 0.0, 1.0]
    with pytest.raises(TunelabError, match="unknown metric"):
        mt.check_metrics(["acuracy"])


def test_length_stats():
    s = mt.length_stats(["a b", "a b c d", "a"])
    assert s["words_mean"] == pytest.approx(7 / 3, abs=0.01) and s["words_median"] == 2 and s["words_max"] == 4


# --- label tasks ----------------------------------------------------------------------------


def test_parse_label():
    labels = ["none", "against", "favor"]
    assert lb.parse_label("Against.", labels) == "against"
    assert lb.parse_label("  FAVOR - the tweet supports it", labels) == "favor"
    assert lb.parse_label("The stance of this tweet is favor", labels) is None  # label too late
    assert lb.parse_label("", labels) is None
    assert lb.parse_label("not hateful", ["hateful", "not hateful"]) == "not hateful"  # longest first
    assert lb.parse_label("Positive", ("positive", "negative")) == "positive"


def test_label_metrics_against_hand_computed_values():
    refs = ["a", "a", "a", "b", "b", "b"]
    pred = ["a", "a", "b", "b", "b", None]  # one error, one unparseable (kept, counted)
    m = lb.label_metrics(pred, refs, ["a", "b"])
    assert m["accuracy"] == pytest.approx(4 / 6) and m["unparseable"] == 1 and m["n"] == 6
    # F1(a) = 0.8 (P 1, R 2/3); F1(b) = 2/3 (P 2/3, R 2/3)
    assert m["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert m["per_class"]["a"]["precision"] == 1.0 and m["per_class"]["b"]["recall"] == pytest.approx(2 / 3)
    # kappa: po = 4/6, pe = (3*2 + 3*3) / 36 -> 9/21
    assert m["cohen_kappa"] == pytest.approx(9 / 21)
    # nominal alpha by hand: Do = 4/12, De = 2*(5*6 + 5*1 + 6*1) / (12*11) -> 1 - 44/82
    assert m["krippendorff_alpha"] == pytest.approx(38 / 82)
    assert m["confusion_matrix"]["counts"] == [[2, 1, 0], [0, 2, 1]]
    with pytest.raises(TunelabError, match="not in --labels"):
        lb.label_metrics(["a"], ["c"], ["a", "b"])


def test_krippendorff_alpha_known_value_with_missing_data():
    # Krippendorff (2011), "Computing Krippendorff's alpha-reliability", nominal example: alpha = 0.743
    nan = None
    coders = [[1, 2, 3, 3, 2, 1, 4, 1, 2, nan, nan, nan],
              [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, nan, 3],
              [nan, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, nan],
              [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, nan]]
    assert lb.krippendorff_alpha(coders) == pytest.approx(0.743, abs=0.001)


# --- uncertainty ----------------------------------------------------------------------------


def test_mcnemar_exact_on_constructed_data():
    # 1 item only A gets right, 9 only B, 10 both: p = 2 * P(X <= 1 | n = 10, 1/2) = 22/1024
    a = [1] * 10 + [1] + [0] * 9
    b = [1] * 10 + [0] + [1] * 9
    r = mcnemar(a, b)
    assert (r["a_right_b_wrong"], r["b_right_a_wrong"]) == (1, 9)
    assert r["p_value"] == pytest.approx(22 / 1024)
    assert mcnemar([1, 0], [1, 0])["p_value"] == 1.0


def test_bootstrap_and_paired_bootstrap():
    values = [1.0] * 70 + [0.0] * 30
    lo, hi = bootstrap_ci("accuracy", values)
    assert lo < 0.7 < hi and 0.05 < hi - lo < 0.25  # binomial 95% CI half-width ~0.09
    better = paired_bootstrap("accuracy", [0.0] * 50 + [1.0] * 50, [1.0] * 100)
    assert better["diff"] == pytest.approx(0.5) and better["ci95"][0] > 0 and better["p_value"] < 0.01
    same = paired_bootstrap("accuracy", values, values)
    assert same["diff"] == 0 and same["p_value"] == 1.0
    # a small difference on few items is not significant
    assert paired_bootstrap("f1", [0.5, 0.6, 0.7, 0.4], [0.55, 0.5, 0.75, 0.45])["p_value"] > 0.1


# --- ratings ---------------------------------------------------------------------------------


def _tournament():
    """A beats B 8 of 10, B beats C 8 of 10, A beats C 9 of 10, interleaved."""
    battles = []
    for k in range(10):
        battles += [("A", "B", 1.0 if k < 8 else 0.0), ("B", "C", 1.0 if k < 8 else 0.0),
                    ("C", "A", 0.0 if k < 9 else 1.0)]
    return battles


def test_elo_and_bradley_terry_order_a_constructed_tournament():
    battles = _tournament()
    elo, bt = elo_ratings(battles), bradley_terry(battles)
    assert elo["A"] > elo["B"] > elo["C"]
    assert bt["A"] > bt["B"] > bt["C"]
    assert sum(bt.values()) / 3 == pytest.approx(1000)
    r = rate(battles, resamples=200)
    assert list(r["bradley_terry"]) == ["A", "B", "C"]
    lo, hi = r["bradley_terry"]["A"]["ci95"]
    assert lo <= r["bradley_terry"]["A"]["rating"] <= hi
    assert r["record"]["A"] == {"wins": 17, "losses": 3, "ties": 0}


def test_bradley_terry_two_players_closed_form():
    # 3 wins to 1, plus one virtual tie: strengths 3.5 : 1.5 -> 400 * log10(7/3) apart
    bt = bradley_terry([("x", "y", 1.0)] * 3 + [("x", "y", 0.0)])
    assert bt["x"] - bt["y"] == pytest.approx(400 * math.log10(7 / 3), abs=0.01)
    assert bradley_terry([("x", "y", 0.5)] * 4)["x"] == pytest.approx(1000)


def test_parse_verdict():
    assert parse_verdict("2") == "2" and parse_verdict("Answer 1.") == "1"
    assert parse_verdict("Tie") == "tie" and parse_verdict("I cannot decide") is None


# --- error flags -----------------------------------------------------------------------------


def test_flags_on_crafted_strings():
    assert flag_answer("   ", "positive") == {"empty": True}
    long = " ".join(["word"] * 5 + ["different", "words", "here", "are", "many", "more", "than", "needed", "now"])
    assert "too_long" in flag_answer(long, "positive")
    assert "too_long" not in flag_answer("positive indeed", "positive")
    assert repeated_ngram("I think so. I think so. I think so.") == "i think so."
    assert repeated_ngram("one two three four five six") is None
    assert "repetitive" in flag_answer("the the the cat the the the cat the the the cat")
    assert misspelled_words("This sentense has a speling error") == ["sentense", "speling"]
    assert misspelled_words("Zyxwv agreed", known_text="Zyxwv is a name") == []  # copied from the prompt
    assert "cut_off" in flag_answer("a b c", answer_tokens=16, max_new_tokens=16)
    assert "cut_off" not in flag_answer("a b c", answer_tokens=3, max_new_tokens=16)


# --- end to end on the tiny model ------------------------------------------------------------

S = SamplingConfig(max_new_tokens=4)


def test_evaluate_writes_all_outputs(tiny_model_dir, sentiment_file, tmp_path):
    from tunelab.evaluation import evaluate

    r = evaluate(str(tiny_model_dir), sentiment_file, labels="positive,negative", limit=6, out=tmp_path / "ev",
                 sampling=S, quiet=True)
    files = {p.name for p in (tmp_path / "ev").iterdir()}
    assert {"predictions.jsonl", "metrics.json", "report.md", "report.html", "confusion_matrix.png",
            "lengths.png"} <= files
    preds = [json.loads(line) for line in (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 6 and all("label" in p and "flags" in p for p in preds)
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    # the random model names no label: every answer is unparseable, counted, none dropped
    assert m["n"] == 6 and m["metrics"]["unparseable"] + m["metrics"]["correct"] <= 6
    assert m["metrics"]["accuracy"] == pytest.approx(m["metrics"]["correct"] / 6)
    html = (tmp_path / "ev" / "report.html").read_text()
    assert "data:image/png;base64," in html and "Krippendorff" in html
    assert r.item_scores["accuracy"] == [float(p["correct"]) for p in preds]


def test_default_out_dir_of_a_run_is_inside_it(tmp_path, tiny_config, sentiment_file, monkeypatch):
    from tunelab import train
    from tunelab.evaluation.runner import default_out

    monkeypatch.chdir(tmp_path)
    run = train(tiny_config, quiet=True).run_dir
    assert default_out(str(run), "test") == run.resolve() / "eval" / "test"
    assert default_out("smollm2-135m-instruct", "test") == tmp_path.joinpath("evals", "smollm2-135m-instruct-test") \
        .relative_to(tmp_path)


def test_cli_eval_and_compare(tiny_model_dir, sentiment_file, tmp_path):
    from tunelab.cli import main

    out = tmp_path / "gen"
    assert main(["eval", str(tiny_model_dir), "--data", str(sentiment_file), "--metrics", "exact_match,f1,rouge_l,bleu",
                 "--limit", "4", "--max-new-tokens", "4", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["metrics"]) >= {"exact_match", "f1", "rouge_l", "bleu", "ci95"} and m["n"] == 4
    assert m["flags"]["cut_off"] >= 0 and "words_mean" in m["lengths"]["answer"]
    cmp = tmp_path / "cmp"
    assert main(["compare", str(tiny_model_dir), str(tiny_model_dir), "--data", str(sentiment_file),
                 "--labels", "positive,negative", "--limit", "4", "--max-new-tokens", "4", "--out", str(cmp)]) == 0
    s = json.loads((cmp / "compare.json").read_text())
    assert s["metrics"]["accuracy"]["paired_bootstrap"]["diff"] == 0  # same model, same greedy answers
    assert s["metrics"]["accuracy"]["mcnemar"]["p_value"] == 1.0 and s["answers_differ"] == 0
    assert (cmp / "a" / "predictions.jsonl").is_file() and (cmp / "report.html").is_file()
    assert main(["eval", str(tiny_model_dir), "--data", str(sentiment_file), "--metrics", "acuracy"]) == 2


def test_compare_finds_differences(tmp_path):
    from tunelab.evaluation import EvalResult, compare

    def fake(answers, model):
        from tunelab.evaluation.runner import score_answers

        items = [{"messages": [{"role": "user", "content": f"q{i}"}], "reference": "positive", "source": f"f:{i}"}
                 for i in range(len(answers))]
        preds, head, scores = score_answers(items, answers, labels=["positive", "negative"])
        from tunelab.evaluation.metrics import length_stats

        info = {"model": model, "data": "t.jsonl", "name": "t", "kind": "labels", "n": len(preds), "metrics": head,
                "seconds": 0.0, "items_per_s": 0.0, "lengths": {"answer": length_stats(answers)}}
        return EvalResult(None, info, preds, scores)

    a = fake(["negative"] * 10 + ["positive"] * 10, "base")
    b = fake(["positive"] * 20, "tuned")
    r = compare(a, b, out=tmp_path / "c")
    acc = r.summary["metrics"]["accuracy"]
    assert acc["a"] == 0.5 and acc["b"] == 1.0 and acc["mcnemar"]["b_right_a_wrong"] == 10
    assert acc["mcnemar"]["p_value"] == pytest.approx(2 / 1024)
    assert r.summary["answers_differ"] == 10 and r.summary["differing_examples"][0]["b_score"] == 1.0
    assert "McNemar" in (tmp_path / "c" / "report.md").read_text()


def test_judge_human_and_model(tiny_model_dir, sentiment_file, tmp_path):
    from tunelab.evaluation import judge

    answers = {"m1": [f"good {i}" for i in range(6)], "m2": [f"bad {i}" for i in range(6)]}
    asked = []
    # a human who always picks "Answer 1": the winner is whichever model the random order showed first
    r = judge(["m1", "m2"], sentiment_file, limit=6, answers=answers, input_fn=lambda q: asked.append(q) or "1",
              out=tmp_path / "j", resamples=50)
    assert len(asked) == 6 and all(j["winner"] == j["answer_1"] for j in r.judgments)
    firsts = [j["answer_1"] for j in r.judgments]
    assert set(firsts) == {"m1", "m2"}  # both orders occur (seeded), so position is not tied to a model
    assert r.ratings["record"]["m1"]["wins"] == firsts.count("m1")
    assert {"judgments.jsonl", "ratings.json", "answers.jsonl", "report.html"} <= {p.name for p in (tmp_path / "j").iterdir()}
    # a judge model (the tiny random one): replies that name no verdict are counted as invalid
    r2 = judge(["m1", "m2"], sentiment_file, limit=2, answers=answers, judge=str(tiny_model_dir), out=tmp_path / "j2",
               resamples=10, quiet=True)
    assert r2.ratings["judge"] == str(tiny_model_dir) and len(r2.judgments) == 2
    assert r2.ratings["invalid"] + r2.ratings["judgments_rated"] == 2
    assert "Which answer is better" in (tmp_path / "j2" / "report.md").read_text()


def test_task_through_evaluate_scores_every_item(tiny_model_dir, tmp_path):
    from tunelab.evaluation import evaluate

    data = Path(__file__).parent / "assets" / "mc" / "arc_easy_llmfoundry_20.jsonl"
    r = evaluate(str(tiny_model_dir), data, task="arc_easy", limit=6, out=tmp_path / "arc")
    assert r.metrics["kind"] == "task" and r.metrics["num_fewshot"] == 0
    assert len(r.predictions) == 6 and set(r.item_scores) == {"acc", "acc_norm"}
    assert r.metrics["metrics"]["acc"] == pytest.approx(sum(r.item_scores["acc"]) / 6)
    assert (tmp_path / "arc" / "metrics.json").exists()


@pytest.mark.parametrize("compile", [False, True])
def test_generation_eval_during_training(tiny_config, sentiment_file, compile):
    from tunelab import train
    from tunelab.runs import read_metrics

    tiny_config["train"]["compile"] = compile  # compiled: the answers come from the blocks run eagerly
    tiny_config["eval"] = {"data": str(sentiment_file), "every_n_steps": 2, "limit": 3, "max_new_tokens": 4,
                           "labels": ["positive", "negative"]}
    run = train(tiny_config, quiet=True).run_dir
    evals = [r for r in read_metrics(run) if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [2, 4]  # every 2 steps, and after training (step 4 once)
    assert all(r["eval_n"] == 3 and 0 <= r["eval_unparseable_rate"] <= 1 for r in evals)
    answers = [_rows(run / "eval" / "training" / f"step-{s}.jsonl") for s in (2, 4)]
    assert [[p["id"] for p in a] for a in answers] == [[0, 1, 2]] * 2
    # the accuracy in metrics.jsonl is the share of answers parsed to their reference label
    assert [sum(p["correct"] for p in a) / 3 for a in answers] == [r["eval_accuracy"] for r in evals]


def test_learning_curve_two_fractions(tiny_config, sentiment_file, tmp_path):
    from tunelab.evaluation import learning_curve

    tiny_config["train"]["max_steps"] = 2
    r = learning_curve(tiny_config, sentiment_file, [0.5, 1.0], labels="positive,negative", limit=3,
                       sampling=S, out=tmp_path / "curve")
    assert [p["examples"] for p in r.points] == [4, 9]  # 12 rows, 3 held out (val_fraction 0.25)
    assert r.metric == "accuracy" and all(0 <= p["value"] <= 1 for p in r.points)
    order = [json.loads(line) for line in (tmp_path / "curve" / "train_order.jsonl").read_text().splitlines()]
    assert len(order) == 12 and order != [json.loads(json.dumps(x)) for x in _rows(sentiment_file)]  # shuffled
    assert {"curve.json", "curve.png", "report.md", "report.html"} <= {p.name for p in (tmp_path / "curve").iterdir()}
    assert json.loads((tmp_path / "curve" / "curve.json").read_text())["points"][1]["examples"] == 9


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_score_answers_needs_references(tmp_path):
    from tunelab.evaluation.runner import load_items, score_answers

    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    with pytest.raises(TunelabError, match="no reference"):
        score_answers(load_items(f), ["hello"], metrics=["f1"])


def test_cli_judge_with_a_judge_model(tiny_model_dir, sentiment_file, tmp_path):
    from conftest import make_tiny_model
    from tunelab.cli import build_parser, main

    other = make_tiny_model(tmp_path / "other", seed=1)
    out = tmp_path / "judge"
    assert main(["judge", str(tiny_model_dir), str(other), "--data", str(sentiment_file), "--judge", str(tiny_model_dir),
                 "--limit", "2", "--max-new-tokens", "3", "--out", str(out)]) == 0
    ratings = json.loads((out / "ratings.json").read_text())
    assert ratings["judgments"] == 2 and ratings["judge"] == str(tiny_model_dir)
    assert len((out / "answers.jsonl").read_text().splitlines()) == 2
    a = build_parser().parse_args(["curve", "c.yaml", "--data", "t.jsonl", "--fractions", "0.5,1", "--set", "seed=1"])
    assert (a.fractions, a.set, a.max_new_tokens) == ("0.5,1", ["seed=1"], None)


def test_quickstart_compares_base_and_tuned_on_the_tiny_model(tiny_model_dir, tiny_config, monkeypatch, tmp_path):
    """The quickstart's evaluation path (label evaluation + compare), with the tiny model standing in."""
    import tunelab.models
    from tunelab.recipes import quickstart as qs

    real_load = tunelab.models.load_model
    monkeypatch.setattr(tunelab.models, "load_model",
                        lambda ref, **kw: real_load(str(tiny_model_dir) if ref == "smollm2-135m-instruct" else ref, **kw))
    monkeypatch.setattr(qs, "quickstart_config", lambda output_dir, max_steps: {**tiny_config, "output_dir": output_dir})
    s = qs.quickstart(output_dir=str(tmp_path / "runs"), max_steps=2, n_eval=4, n_show=2)
    run = Path(s["run_dir"])
    assert s["base"]["n"] == 4 and 0 <= s["mcnemar"]["p_value"] <= 1 and "cohen_kappa" in s["tuned"]
    assert (run / "eval" / "quickstart-compare" / "report.html").is_file()
    assert "McNemar" in (run / "quickstart.md").read_text()
