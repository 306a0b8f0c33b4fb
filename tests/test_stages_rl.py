"""stages grpo and ppo with a rule reward (a Python function named in the config) raise the expected reward.

The policy is a tiny random Llama with a 300-token byte-level vocabulary (trained here with our
tokenizer trainer) and one-token completions, so the expected reward of the policy can be computed
exactly from its next-token distribution: no sampling noise in the assertion.
"""

import json
import math
from pathlib import Path

import pytest
import torch

import tunelab
from conftest import write_jsonl
from tunelab.errors import ConfigError, RunError

CORPUS = Path(__file__).parent / "assets" / "corpus" / "war_and_peace_slice.txt"
PROMPTS = [f"Write something about {t}." for t in ["cats", "rain", "pizza", "trains", "music", "chess", "coffee",
                                                     "books"]]
REWARD = "def letters(prompts, completions, **columns):\n    return [sum(ch.isalpha() for ch in c) / max(len(c), 1) for c in completions]\n"


def _letter_share(text: str) -> float:
    return sum(ch.isalpha() for ch in text) / max(len(text), 1)


def _expected_reward(ref) -> float:
    model, tok = tunelab.load_model(str(ref), dtype="fp32", device="cpu", chat_template="chatml")
    reward = torch.tensor([_letter_share(tok.decode([i])) for i in range(len(tok))])
    total = 0.0
    for prompt in PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            total += float(model(input_ids=ids).logits[0, -1].softmax(-1) @ reward)
    return total / len(PROMPTS)


@pytest.fixture(scope="module")
def small_vocab_model(tmp_path_factory) -> Path:
    from tunelab.training.stages.pretrain import new_model
    from tunelab.training.stages.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("small_vocab")
    tok = train_tokenizer([CORPUS.read_text()], 300, folder)
    new_model("llama-tiny", tok, 128, seed=0).save_pretrained(folder)
    return folder


def rl_config(tmp_path, model, stage: str, **rl) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "rules.py").write_text(REWARD)
    return {"name": stage, "output_dir": str(tmp_path / "runs"), "seed": 0, "stage": stage, "method": "full",
            "model": {"ref": str(model), "dtype": "fp32", "chat_template": "chatml"},
            "data": {"train": str(write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS])),
                     "max_seq_len": 128},
            "rl": {"reward_function": f"{tmp_path / 'rules.py'}:letters", "max_new_tokens": 1, **rl},
            "train": {"max_steps": 6, "micro_batch_size": 4, "grad_accum_steps": 1, "learning_rate": 1e-3,
                      "lr_scheduler": "constant", "eval_every_n_steps": 0, "save_every_n_steps": 0, "warmup_steps": 0}}


def test_grpo_with_a_rule_reward_raises_the_expected_reward(tmp_path, small_vocab_model):
    cfg = rl_config(tmp_path, small_vocab_model, "grpo", num_generations=8)
    before = _expected_reward(small_vocab_model)
    result = tunelab.train(cfg, quiet=True)
    after = _expected_reward(result.final_dir)
    assert after > before + 0.03, (before, after)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6] and all("reward" in r for r in records)
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["stage"] == "grpo" and manifest["reward_first"] is not None


def test_grpo_reward_function_errors(tmp_path, small_vocab_model):
    cfg = {"stage": "grpo", "model": {"ref": str(small_vocab_model)},
           "data": {"train": str(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}]))},
           "rl": {"reward_function": "no_such_module_xyz:fn"}, "output_dir": str(tmp_path / "runs")}
    with pytest.raises(ConfigError, match="cannot load 'no_such_module_xyz'"):
        tunelab.train(cfg, quiet=True)
    with pytest.raises(ConfigError, match="module:function"):
        tunelab.load_config(cfg, {"rl.reward_function": "nocolon"})


def test_ppo_with_a_rule_reward_raises_the_expected_reward(tmp_path, small_vocab_model):
    cfg = rl_config(tmp_path, small_vocab_model, "ppo", ppo_epochs=4)
    cfg["train"].update(max_steps=8, grad_accum_steps=2)  # rollouts of 8 prompts, one answer each
    before = _expected_reward(small_vocab_model)
    result = tunelab.train(cfg, quiet=True)
    after = _expected_reward(result.final_dir)
    assert after > before + 0.03, (before, after)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert all({"reward", "kl", "policy_loss", "value_loss"} <= set(r) for r in records)
    assert (result.final_dir / "value_head.safetensors").is_file()
    assert json.loads((result.run_dir / "manifest.json").read_text())["stage"] == "ppo"


def test_ppo_lora_with_kl_resumes_to_the_same_weights(tmp_path, small_vocab_model, monkeypatch):
    """Ctrl-C mid-run saves after the current rollout; --resume then ends where an unbroken run does."""
    import os
    import signal

    from safetensors.torch import load_file

    from tunelab.training.stages import ppo

    def run(folder, interrupt_at=None):
        cfg = rl_config(folder, small_vocab_model, "ppo", ppo_epochs=2, beta=0.05, max_new_tokens=3)
        cfg.update(method="lora", lora={"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"})
        cfg["train"].update(max_steps=3, learning_rate=5e-3)
        calls = {"n": 0}
        real = ppo.ppo_updates

        def updates(*args, **kw):
            calls["n"] += 1
            if calls["n"] == interrupt_at:
                os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C during this step
            return real(*args, **kw)

        monkeypatch.setattr(ppo, "ppo_updates", updates)
        return cfg, tunelab.train(cfg, quiet=True)

    _, whole = run(tmp_path / "a")
    cfg, cut = run(tmp_path / "b", interrupt_at=2)
    assert cut.interrupted and cut.steps == 2 and (cut.run_dir / "checkpoints" / "step-000002").is_dir()
    monkeypatch.setattr(ppo, "ppo_updates", ppo.ppo_updates)
    resumed = tunelab.train(cfg, resume=cut.run_dir, quiet=True)
    assert resumed.steps == 3
    a = load_file(whole.final_dir / "adapter_model.safetensors")
    b = load_file(resumed.final_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    kls = [json.loads(line)["kl"] for line in (whole.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert kls[0] == pytest.approx(0, abs=1e-5) and any(abs(k) > 1e-6 for k in kls[1:])  # starts at the reference


def test_ppo_against_a_reward_model_folder(tmp_path, small_vocab_model):
    """rl.reward_model: a sequence classifier scores prompt + answer (here an untrained one)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    rm_dir = tmp_path / "rm"
    config = AutoConfig.from_pretrained(small_vocab_model, num_labels=1)
    config.pad_token_id = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    AutoModelForSequenceClassification.from_config(config).save_pretrained(rm_dir)
    AutoTokenizer.from_pretrained(small_vocab_model).save_pretrained(rm_dir)
    cfg = rl_config(tmp_path, small_vocab_model, "ppo", reward_function=None, reward_model=str(rm_dir),
                    max_new_tokens=4, ppo_epochs=1)
    cfg["train"].update(max_steps=2)
    result = tunelab.train(cfg, quiet=True)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(math.isfinite(r["reward"]) and math.isfinite(r["loss"]) for r in records)


def test_ppo_refuses_fp16_before_loading(tmp_path, small_vocab_model):
    """Its updates have no loss scaling (the SFT loop's is training/loss_scaling.py)."""
    config = rl_config(tmp_path, small_vocab_model, "ppo")
    config["model"]["dtype"] = "fp16"
    with pytest.raises(RunError, match="stage ppo runs in bf16 or fp32, not fp16"):
        tunelab.train(config, quiet=True)
