"""stage grpo with a rule reward (a Python function named in the config) raises the expected reward.

The policy is a tiny random Llama with a 300-token byte-level vocabulary (trained here with our
tokenizer trainer) and one-token completions, so the expected reward of the policy can be computed
exactly from its next-token distribution: no sampling noise in the assertion.
"""

import json
from pathlib import Path

import pytest
import torch

import tunelab
from conftest import write_jsonl
from tunelab.errors import ConfigError

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


def test_grpo_with_a_rule_reward_raises_the_expected_reward(tmp_path, small_vocab_model):
    (tmp_path / "rules.py").write_text(REWARD)
    cfg = {"name": "grpo", "output_dir": str(tmp_path / "runs"), "seed": 0, "stage": "grpo", "method": "full",
           "model": {"ref": str(small_vocab_model), "dtype": "fp32", "chat_template": "chatml"},
           "data": {"train": str(write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS])),
                    "max_seq_len": 128},
           "rl": {"reward_function": f"{tmp_path / 'rules.py'}:letters", "num_generations": 8, "max_new_tokens": 1},
           "train": {"max_steps": 6, "micro_batch_size": 4, "grad_accum_steps": 1, "learning_rate": 1e-3,
                     "lr_scheduler": "constant", "eval_every_n_steps": 0, "save_every_n_steps": 0, "warmup_steps": 0}}
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
