"""Evaluation: score a model's answers with numbers a researcher can publish.

    evaluate(model, data, metrics=... | labels=... | task=...)  -> EvalResult (and an output folder)
    compare(a, b, data, ...)        two models on the same items, paired tests  -> CompareResult
    judge([a, b], data, judge=...)  blind pairwise A/B judgments, Elo and Bradley-Terry -> JudgeResult
    learning_curve(config, data, fractions=...)  train on nested subsets, evaluate each -> CurveResult

Module names differ from the function names on purpose (runner, paired, judging, curve): a
submodule named `compare` would shadow the function `compare` on this package.
"""

import importlib

_API = {
    "evaluate": "runner", "EvalResult": "runner", "score_answers": "runner",
    "compare": "paired", "CompareResult": "paired",
    "judge": "judging", "JudgeResult": "judging", "elo_ratings": "judging", "bradley_terry": "judging",
    "learning_curve": "curve", "CurveResult": "curve",
    "parse_label": "labels", "label_metrics": "labels",
}
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(f"tunelab.evaluation.{_API[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tunelab.evaluation' has no attribute {name!r}")
