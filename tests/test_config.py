"""Config: YAML + overrides, unknown keys with did-you-mean, every problem reported at once."""

from pathlib import Path

import pytest

from tunelab.config import load_config, save_config
from tunelab.errors import ConfigError

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))


def test_defaults_and_overrides():
    cfg = load_config({"data": {"train": "x.jsonl"}}, ["train.max_steps=50", "lora.rank=8", "train.learning_rate=1e-4",
                                                      "lora.target_modules=[q_proj, v_proj]"])
    assert cfg.train.max_steps == 50 and cfg.lora.rank == 8 and cfg.train.learning_rate == 1e-4
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.model.ref == "smollm2-135m-instruct" and cfg.method == "lora"


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    # PyYAML reads "2e-4" as a string; a learning rate written that way must still work
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  train: x.jsonl\ntrain:\n  learning_rate: 2e-4\n")
    assert load_config(path).train.learning_rate == pytest.approx(2e-4)


def test_all_problems_at_once_with_fixes():
    with pytest.raises(ConfigError) as e:
        load_config({"data": {"train": "x.jsonl", "max_seq_length": 512},
                     "lora": {"rnak": 8}, "train": {"micro_batch_size": 0, "lr_scheduler": "cosin"},
                     "method": "loraa"})
    problems = e.value.problems
    text = str(e.value)
    assert "did you mean data.max_seq_len" in text
    assert "did you mean lora.rank" in text
    assert len(problems) == 2  # unknown keys first; cross-field checks once the keys are right
    with pytest.raises(ConfigError) as e:
        load_config({"data": {"train": "x.jsonl"}, "train": {"micro_batch_size": 0, "lr_scheduler": "cosin"},
                     "method": "loraa"})
    text = str(e.value)
    assert "train.micro_batch_size=0 must be > 0" in text
    assert "did you mean 'cosine'" in text and "did you mean 'lora'" in text
    assert len(e.value.problems) == 3


def test_wrong_types_name_the_key():
    with pytest.raises(ConfigError, match=r"train.max_steps='many' should be an integer or null"):
        load_config({"data": {"train": "x"}, "train": {"max_steps": "many"}})
    with pytest.raises(ConfigError, match="train.packing=3 should be true or false"):
        load_config({"data": {"train": "x"}, "train": {"packing": 3}})


def test_missing_train_file_and_bad_override():
    with pytest.raises(ConfigError) as e:
        load_config({}, ["train.max_steps"])
    assert "key=value" in str(e.value)
    with pytest.raises(ConfigError, match="data.train is empty"):
        load_config({})


def test_full_method_rejects_a_lora_learning_rate():
    with pytest.raises(ConfigError, match="method=full"):
        load_config({"data": {"train": "x"}, "method": "full", "train": {"learning_rate": 2e-3}})


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  train: x.jsonl\n  format: [oops\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(path)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config({"data": {"train": "x.jsonl"}}, {"train.epochs": 2})
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_config_validates(path, tmp_path, monkeypatch):
    assert EXAMPLES, "examples/ has no YAML"
    monkeypatch.chdir(tmp_path)  # data paths resolve beside the config, wherever the user runs it
    cfg = load_config(path)
    assert Path(cfg.data.train).is_file()
    assert cfg.data.validation is None or Path(cfg.data.validation).is_file()
