"""tunelab.judge: blind pairwise A/B judgments, then Elo and Bradley-Terry ratings with CIs.

Every model answers every prompt. For each prompt and each pair of models the two answers are
shown as "Answer 1" and "Answer 2" in a seeded random order, without the models' names, to a
human at the terminal or to a local judge model (prompt: JUDGE_PROMPT, greedy decoding). A
verdict is 1, 2 or tie; a judge-model reply that names none is kept as "invalid" (counted, not
rated).

Ratings, on the familiar Elo scale (1000 = average, +400 = 10:1 odds):
  Elo            sequential updates (K = 16) over the judgments in their order.
  Bradley-Terry  maximum likelihood (Hunter's MM algorithm); a tie is half a win for each side,
                 and each pair gets one virtual tie so a model that never wins keeps a finite rating.
  CIs            2.5th / 97.5th percentiles over 1000 bootstrap resamples of the judgments
                 (Elo also reshuffles their order in each resample).
"""

import itertools
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tunelab.errors import TunelabError
from tunelab.evaluation import report as rp
from tunelab.evaluation.runner import load_items, model_name

JUDGE_PROMPT = """You are comparing two answers to the same request. Decide which answer is better: more correct, \
more helpful and clearer. The order of the answers is random; do not prefer an answer for its position or its length.

Request:
{question}

Answer 1:
{answer_1}

Answer 2:
{answer_2}

Which answer is better? Reply with exactly one of: 1, 2, tie."""


@dataclass
class JudgeResult:
    out_dir: Path | None
    ratings: dict
    """{"elo": {model: {"rating", "ci95"}}, "bradley_terry": {...}, "record": {model: wins/losses/ties}}."""
    judgments: list[dict]


def parse_verdict(text: str) -> str | None:
    t = text.strip().lower()
    for token in t.replace(".", " ").replace(":", " ").split()[:6]:
        if token in ("1", "2"):
            return token
        if token in ("tie", "equal", "both"):
            return "tie"
    return None


def elo_ratings(battles: list[tuple[str, str, float]], k: float = 16.0, base: float = 1000.0) -> dict[str, float]:
    """battles: (a, b, score of a: 1 win, 0.5 tie, 0 loss), applied in order."""
    r: dict[str, float] = {}
    for a, b, s in battles:
        ra, rb = r.setdefault(a, base), r.setdefault(b, base)
        ea = 1 / (1 + 10 ** ((rb - ra) / 400))
        r[a], r[b] = ra + k * (s - ea), rb - k * (s - ea)
    return r


def bradley_terry(battles: list[tuple[str, str, float]], iters: int = 200, prior: float = 1.0) -> dict[str, float]:
    """Bradley-Terry strengths on the Elo scale (mean 1000); `prior` virtual ties per pair."""
    players = sorted({p for a, b, _ in battles for p in (a, b)})
    idx = {p: i for i, p in enumerate(players)}
    n = len(players)
    wins, games = np.zeros((n, n)), np.zeros((n, n))
    for a, b, s in battles:
        i, j = idx[a], idx[b]
        wins[i, j] += s
        wins[j, i] += 1 - s
        games[i, j] += 1
        games[j, i] += 1
    off = 1 - np.eye(n)
    wins += prior / 2 * off
    games += prior * off
    p = np.ones(n)
    for _ in range(iters):
        denom = (games / (p[:, None] + p[None, :])).sum(axis=1)
        p = wins.sum(axis=1) / denom
        p /= np.exp(np.log(p).mean())
    return {pl: float(1000 + 400 * math.log10(p[idx[pl]])) for pl in players}


def rate(battles: list[tuple[str, str, float]], resamples: int = 1000, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    elo, bt = elo_ratings(battles), bradley_terry(battles)
    boot_elo, boot_bt = {p: [] for p in elo}, {p: [] for p in elo}
    for _ in range(resamples if len(battles) > 1 else 0):
        sample = [battles[i] for i in rng.integers(0, len(battles), len(battles))]
        e, b = elo_ratings(sample), bradley_terry(sample, iters=100)
        for p in elo:
            boot_elo[p].append(e.get(p, 1000.0))
            boot_bt[p].append(b.get(p, 1000.0))

    def with_ci(point, boot):
        return {p: {"rating": round(v, 1), "ci95": [round(float(np.quantile(boot[p], q)), 1) for q in (0.025, 0.975)]
                    if boot[p] else None} for p, v in sorted(point.items(), key=lambda x: -x[1])}

    record = {p: {"wins": 0, "losses": 0, "ties": 0} for p in elo}
    for a, b, s in battles:
        key_a, key_b = ("wins", "losses") if s == 1 else ("losses", "wins") if s == 0 else ("ties", "ties")
        record[a][key_a] += 1
        record[b][key_b] += 1
    return {"elo": with_ci(elo, boot_elo), "bradley_terry": with_ci(bt, boot_bt), "record": record,
            "judgments_rated": len(battles)}


def _human(question: str, one: str, two: str, i: int, total: int, input_fn) -> str | None:
    print(f"\n{'=' * 70}\n[{i + 1}/{total}] {question}\n{'-' * 70}\nAnswer 1:\n{one}\n{'-' * 70}\nAnswer 2:\n{two}\n")
    while True:
        v = input_fn("Better answer? [1/2/t(ie)/s(kip)/q(uit)]: ").strip().lower()
        if v in ("1", "2"):
            return v
        if v in ("t", "tie"):
            return "tie"
        if v in ("s", "skip"):
            return "skip"
        if v in ("q", "quit"):
            return "quit"


def judge(models: list, data: "str | Path", *, judge: str | None = None, limit: int | None = None,
          out: "str | Path | None" = None, sampling=None, batch_size: int = 8, dtype: str = "auto",
          system_prompt: str | None = None, seed: int = 0, resamples: int = 1000, input_fn=input,
          quiet: bool = False, answers: dict | None = None) -> JudgeResult:
    """Pairwise blind judgments of two or more models' answers; Elo and Bradley-Terry ratings.

    Args:
        models: two or more model references.
        judge: None = you, at the terminal; or a judge model reference (uses JUDGE_PROMPT).
        answers: {model: [answers]} already generated (skips generation; for tests and reuse).
    Writes answers.jsonl, judgments.jsonl, ratings.json, report.md/.html to `out`
    (default evals/judge-<a>-vs-<b>-<data>).
    """
    from tunelab.generation import SamplingConfig, generate
    from tunelab.models import load_model

    if len(models) < 2 or len(set(map(str, models))) != len(models):
        raise TunelabError(f"judge needs two or more different models, got {models!r}")
    items = load_items(data, limit)
    questions = [it["messages"][-1]["content"] for it in items]
    answers = dict(answers or {})
    for m in models:
        if m not in answers:
            model, tok = load_model(str(m), dtype=dtype)
            answers[m] = generate(model, tok, [it["messages"] for it in items], sampling or SamplingConfig(),
                                  batch_size, system_prompt, progress=not quiet)
            del model
    rng = random.Random(seed)
    shown = []  # (item, first model, second model)
    for i in range(len(items)):
        for a, b in itertools.combinations(models, 2):
            shown.append((i, *((a, b) if rng.random() < 0.5 else (b, a))))
    rng.shuffle(shown)  # items and pairs in random order, so fatigue and drift spread over both
    verdicts: list[str | None] = []
    if judge is None:
        for k, (i, x, y) in enumerate(shown):
            v = _human(questions[i], answers[x][i], answers[y][i], k, len(shown), input_fn)
            if v == "quit":
                break
            verdicts.append(v)
        raw = [None] * len(verdicts)
    else:
        jm, jt = load_model(str(judge), dtype=dtype)
        prompts = [JUDGE_PROMPT.format(question=questions[i], answer_1=answers[x][i], answer_2=answers[y][i])
                   for i, x, y in shown]
        raw = generate(jm, jt, prompts, SamplingConfig(max_new_tokens=8), batch_size, progress=not quiet)
        verdicts = [parse_verdict(t) for t in raw]
    judgments, battles = [], []
    for (i, x, y), v, text in zip(shown, verdicts, raw):
        winner = {"1": x, "2": y, "tie": "tie"}.get(v) if v else None
        judgments.append({"item": i, "source": items[i]["source"], "answer_1": x, "answer_2": y,
                          "verdict": v if v is not None else "invalid", "winner": winner, "judge_reply": text})
        if v in ("1", "2", "tie"):
            battles.append((x, y, {"1": 1.0, "2": 0.0, "tie": 0.5}[v]))
    ratings = rate(battles, resamples, seed) if battles else {"elo": {}, "bradley_terry": {}, "record": {},
                                                               "judgments_rated": 0}
    ratings.update(judge=str(judge) if judge else "human", judgments=len(judgments),
                   skipped=sum(j["verdict"] == "skip" for j in judgments),
                   invalid=sum(j["verdict"] == "invalid" for j in judgments), seed=seed)
    result = JudgeResult(None, ratings, judgments)
    name = "judge-" + "-vs-".join(model_name(m) for m in models) + f"-{Path(data).stem}"
    result.out_dir = _write(Path(out) if out else Path("evals") / name, result, models, items, answers, judge)
    return result


def ratings_plot(ratings: dict) -> bytes:
    plt = rp.pyplot()
    names = list(ratings["bradley_terry"])
    fig, ax = plt.subplots(figsize=(6, 0.6 * len(names) + 1.5))
    for off, key in ((-0.15, "elo"), (0.15, "bradley_terry")):
        r = ratings[key]
        vals = [r[n]["rating"] for n in names]
        lo = [v - (r[n]["ci95"] or [v, v])[0] for n, v in zip(names, vals)]
        hi = [(r[n]["ci95"] or [v, v])[1] - v for n, v in zip(names, vals)]
        ax.errorbar(vals, [i + off for i in range(len(names))], xerr=[lo, hi], fmt="o", capsize=4, label=key)
    ax.set_yticks(range(len(names)), [model_name(n) for n in names])
    ax.set_xlabel("rating (95% CI)")
    ax.legend()
    return rp.png(fig)


def _write(out: Path, r: JudgeResult, models, items, answers, judge) -> Path:
    s = r.ratings
    blocks = [("h1", "Pairwise judgments: " + " vs ".join(map(str, models))),
              ("p", f"Judge: {s['judge']}. {s['judgments']} judgments ({s['judgments_rated']} rated, {s['skipped']} "
                    f"skipped, {s['invalid']} invalid), blind and in seeded random order (seed {s['seed']})."),
              ("table", ["model", "Elo", "Elo 95% CI", "Bradley-Terry", "BT 95% CI", "wins", "losses", "ties"],
               [[m, s["elo"][m]["rating"], rp.ci(s["elo"][m]["ci95"]).replace(".0000", ""),
                 s["bradley_terry"][m]["rating"], rp.ci(s["bradley_terry"][m]["ci95"]).replace(".0000", ""),
                 s["record"][m]["wins"], s["record"][m]["losses"], s["record"][m]["ties"]]
                for m in s["bradley_terry"]])]
    images = {}
    if s["bradley_terry"]:
        images["ratings.png"] = ratings_plot(s)
        blocks.append(("img", "ratings.png", images["ratings.png"], "ratings"))
    if judge:
        blocks += [("h2", "Judge prompt"), ("pre", JUDGE_PROMPT)]
    lines = "".join(json.dumps({"source": it["source"], "prompt": it["messages"][-1]["content"],
                                **{str(m): answers[m][i] for m in models}}, ensure_ascii=False) + "\n"
                    for i, it in enumerate(items))
    files = {"answers.jsonl": lines,
             "judgments.jsonl": "".join(json.dumps(j, ensure_ascii=False) + "\n" for j in r.judgments),
             "ratings.json": json.dumps(s, indent=2) + "\n"}
    return rp.write_folder(out, blocks, images, files, "tunelab judge")
