"""dpo / orpo / kto / reward on TRL behind tunelab's config, on the tiny model with a learnable toy set."""

import json
import shutil

import pytest
import torch

import tunelab
from conftest import write_jsonl
from tunelab.data.preference import load_preference_rows
from tunelab.errors import ConfigError, DataError

TOPICS = ["cats", "rain", "pizza", "trains", "music", "the sea", "chess", "winter", "coffee", "books",
          "hiking", "robots"]
HELD_OUT = ["tea", "snow", "bicycles", "jazz"]
GOOD = ["Yes, very much.", "Yes, I love it.", "Yes, always."]
BAD = ["No, not at all.", "No, I hate it.", "No, never."]


def _pairs(topics):
    return [{"prompt": f"Do you like {t}?", "chosen": GOOD[i % 3], "rejected": BAD[i % 3]} for i, t in enumerate(topics)]


@pytest.fixture
def pref_config(tmp_path, tiny_model_dir) -> dict:
    return {"name": "pref", "output_dir": str(tmp_path / "runs"), "seed": 0, "stage": "dpo",
            "model": {"ref": str(tiny_model_dir), "dtype": "fp32"},
            "data": {"train": str(write_jsonl(tmp_path / "train.jsonl", _pairs(TOPICS))),
                     "validation": str(write_jsonl(tmp_path / "held.jsonl", _pairs(HELD_OUT))), "max_seq_len": 64},
            "lora": {"rank": 4, "alpha": 8, "dropout": 0.0}, "preference": {"max_prompt_len": 32},
            "train": {"max_steps": 6, "micro_batch_size": 4, "grad_accum_steps": 1, "learning_rate": 1e-2,
                      "eval_every_n_steps": 0, "save_every_n_steps": 0, "warmup_steps": 0}}


def _logp(model, tok, prompt, answer) -> float:
    """Sum of log-probabilities of the answer tokens after the chat-rendered prompt."""
    head = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(prompt + answer, tokenize=False)
    n = len(tok(head, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([tok(full, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
    return float(logp[torch.arange(n - 1, ids.shape[1] - 1), ids[0, n:]].sum())


def _margin(model, tok, path) -> float:
    rows, _ = load_preference_rows(path, "dpo")
    return sum(_logp(model, tok, r["prompt"], r["chosen"]) - _logp(model, tok, r["prompt"], r["rejected"])
               for r in rows) / len(rows)


def test_dpo_raises_chosen_minus_rejected_margin_on_held_out_pairs(pref_config, tiny_model_dir):
    base, tok = tunelab.load_model(str(tiny_model_dir), dtype="fp32", device="cpu")
    before = _margin(base, tok, pref_config["data"]["validation"])
    result = tunelab.train(pref_config, quiet=True)
    tuned, _ = tunelab.load_model(str(result.run_dir), dtype="fp32", device="cpu")
    after = _margin(tuned, tok, pref_config["data"]["validation"])
    assert after > before + 1.0, (before, after)
    assert result.val_loss_after < result.val_loss_before  # DPO loss on the held-out pairs
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["stage"] == "dpo" and manifest["val_metrics_after"]["rewards/margins"] > 0
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "data_report.json", "final/adapter_model.safetensors"):
        assert (result.run_dir / name).is_file(), name


def test_dpo_in_bf16_on_a_cpu_without_a_bf16_unit_is_warned(pref_config, monkeypatch, capsys):
    """The TRL stages warn as the SFT loop does (tests/test_train.py) when bf16 would be emulated."""
    monkeypatch.setattr("tunelab.hardware.cpu_has_fast_bf16", lambda: False)
    tunelab.train({**pref_config, "model": {**pref_config["model"], "dtype": "bf16"},
                   "train": {**pref_config["train"], "max_steps": 1}}, quiet=True)
    assert "no fast bf16 unit" in capsys.readouterr().out


def test_reward_model_ranks_chosen_above_rejected_on_held_out_pairs(pref_config, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    pref_config.update(stage="reward", method="full")
    pref_config["train"].update(learning_rate=1e-3, max_steps=8)
    result = tunelab.train(pref_config, quiet=True)
    rm = AutoModelForSequenceClassification.from_pretrained(result.final_dir).eval()
    tok = AutoTokenizer.from_pretrained(result.final_dir)
    rows, _ = load_preference_rows(pref_config["data"]["validation"], "reward")

    def score(prompt, answer):
        ids = tok(tok.apply_chat_template(prompt + answer, tokenize=False), return_tensors="pt")
        with torch.no_grad():
            return float(rm(**ids).logits[0, 0])

    wins = [score(r["prompt"], r["chosen"]) > score(r["prompt"], r["rejected"]) for r in rows]
    assert all(wins)
    first = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and first["val_accuracy"] < 1.0  # it was not ranking them before training


@pytest.mark.parametrize("stage", ["orpo", "kto"])
def test_orpo_and_kto_train_and_lower_their_validation_loss(pref_config, stage):
    pref_config["stage"] = stage
    pref_config["lora"]["use_dora"] = stage == "kto"  # DoRA through the TRL path too
    result = tunelab.train(pref_config, {"train.max_steps": 4}, quiet=True)
    assert result.val_loss_after < result.val_loss_before
    assert (result.final_dir / "adapter_model.safetensors").is_file()


def test_resume_continues_from_the_last_checkpoint(pref_config):
    pref_config["train"].update(max_steps=4, save_every_n_steps=2)
    first = tunelab.train(pref_config, quiet=True)
    run = first.run_dir
    # as if the run had died after step 2
    for p in (run / "final", run / "checkpoints" / "checkpoint-4"):
        shutil.rmtree(p)
    (run / "manifest.json").unlink()
    resumed = tunelab.train(pref_config, resume=True, quiet=True)
    assert resumed.run_dir == run and resumed.steps == 4
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == [1, 2, 3, 4]
    with pytest.raises(tunelab.RunError, match="already finished"):
        tunelab.train(pref_config, resume=True, quiet=True)


def test_preference_formats(tmp_path):
    share = tmp_path / "dpo.json"
    share.write_text(json.dumps([{"conversations": [{"from": "human", "value": "Hi"}],
                                  "chosen": {"from": "gpt", "value": "Hello!"},
                                  "rejected": {"from": "gpt", "value": "Go away."}}], indent=2))
    rows, fmt = load_preference_rows(share, "dpo")
    assert fmt == "sharegpt" and rows == [{"prompt": [{"role": "user", "content": "Hi"}],
                                           "chosen": [{"role": "assistant", "content": "Hello!"}],
                                           "rejected": [{"role": "assistant", "content": "Go away."}]}]
    implicit = write_jsonl(tmp_path / "m.jsonl", [{
        "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
        "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Bye."}]}])
    rows, fmt = load_preference_rows(implicit, "dpo")
    assert fmt == "pairs" and rows[0]["prompt"] == [{"role": "user", "content": "Hi"}]
    kto_rows, _ = load_preference_rows(implicit, "kto")  # a pair gives one desirable and one undesirable row
    assert [r["label"] for r in kto_rows] == [True, False]
    kto = write_jsonl(tmp_path / "k.jsonl", [{"prompt": "Hi", "completion": "Hello!", "label": True},
                                             {"prompt": "Hi", "completion": "Bye.", "label": "yes"}])
    with pytest.raises(DataError, match=r"k.jsonl:2: KTO label must be true"):
        load_preference_rows(kto, "kto")
    bad = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "a", "chosen": "x", "rejected": "y"},
                                             {"prompt": "a", "chosen": "x"}])
    with pytest.raises(DataError, match=r"b.jsonl:2: missing field 'rejected'"):
        load_preference_rows(bad, "dpo")


def test_shared_llamafactory_dpo_and_kto_demos_load():
    from pathlib import Path

    root = Path("/work/shared/data/instruction")
    if not root.is_dir():
        pytest.skip("shared data not present")
    rows, fmt = load_preference_rows(root / "llamafactory_dpo_en_demo.json", "dpo")
    assert fmt == "sharegpt" and len(rows) == 300
    rows, fmt = load_preference_rows(root / "llamafactory_kto_en_demo.json", "kto")
    assert fmt == "kto" and {r["label"] for r in rows} == {True, False}


def test_stage_config_errors(pref_config):
    with pytest.raises(ConfigError) as e:
        tunelab.load_config(pref_config, {"stage": "orppo"})
    assert "did you mean 'orpo'" in str(e.value)
    with pytest.raises(ConfigError, match="needs a reward"):
        tunelab.load_config(pref_config, {"stage": "grpo"})
    with pytest.raises(ConfigError, match="loss_type"):
        tunelab.load_config(pref_config, {"preference.loss_type": "nope"})
