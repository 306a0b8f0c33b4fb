"""Every stage example validates from any directory, and its reward function resolves beside it."""

from pathlib import Path

import pytest

from tunelab.config import load_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
STAGES = ["pretrain", "dpo", "orpo", "kto", "reward", "grpo", "ppo"]


@pytest.mark.parametrize("stage", STAGES)
def test_stage_example_validates(stage, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(EXAMPLES / f"{stage}.yaml")
    assert cfg.stage == stage and Path(cfg.data.train).is_file()
    if stage in ("grpo", "ppo"):
        from tunelab.training.stages.trl_stages import load_reward_function

        fn = load_reward_function(cfg.rl.reward_function)
        assert fn(prompts=["q"], completions=["A short and complete answer here.", ""]) == [1.5, 0.0]


@pytest.mark.parametrize("stage", ["dpo", "orpo", "reward", "kto"])
def test_stage_example_data_loads(stage):
    from tunelab.data.preference import load_preference_rows

    cfg = load_config(EXAMPLES / f"{stage}.yaml")
    rows, _ = load_preference_rows(cfg.data.train, stage)
    assert len(rows) >= 300
