"""The embedded SmolLM2-135M-Instruct, for real: loading, tuning, merging, the quickstart.

Marked real_model (they take about two minutes together); CI runs them.
"""

import pytest
import torch

import tunelab
from tunelab.recipes.quickstart import quickstart_data

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory):
    train_file, test_file = quickstart_data()
    cfg = {"name": "real", "output_dir": str(tmp_path_factory.mktemp("runs")), "seed": 0,
           "model": {"ref": "smollm2-135m-instruct"},
           "data": {"train": str(train_file), "val_fraction": 0.02, "max_seq_len": 256, "limit": 64},
           "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
           "train": {"max_steps": 8, "micro_batch_size": 8, "grad_accum_steps": 1, "learning_rate": 3e-4,
                     "warmup_steps": 1, "eval_every_n_steps": 0, "save_every_n_steps": 0}}
    return tunelab.train(cfg, quiet=True)


def test_alias_loads_the_real_model_with_its_chat_template():
    model, tok = tunelab.load_model("smollm2-135m-instruct", dtype="fp32")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 136e6
    assert "<|im_start|>" in tok.chat_template and tok.eos_token == "<|im_end|>"
    answer = tunelab.generate(model, tok, ["What is the capital of France?"], max_new_tokens=16)[0]
    assert "Paris" in answer


def test_a_few_lora_steps_lower_the_validation_loss(tuned_run):
    assert tuned_run.val_loss_after < tuned_run.val_loss_before - 0.2


def test_merged_logits_equal_adapter_logits(tuned_run, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tunelab.export(str(tuned_run.run_dir), format="merged", out=tmp_path / "merged")
    adapter_model, tok = tunelab.load_model(str(tuned_run.run_dir), dtype="fp32")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": "Is 'great food' positive or negative?"}],
                                  add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    with torch.no_grad():
        a, b = adapter_model(input_ids=ids).logits, merged(input_ids=ids).logits
    # fp32 rounding of W + BA over 30 layers: max |diff| seen 1.2e-4 and 2.5e-4 (two trainings) on
    # logits of ~30, i.e. ~1e-5 of them; a wrongly merged layer moves them by far more
    torch.testing.assert_close(a, b, atol=5e-4, rtol=1e-5)
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_quickstart_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    summary = tunelab.quickstart(output_dir=str(tmp_path / "runs"), max_steps=4, n_eval=8, n_show=2)
    run = tmp_path / "runs"
    (run_dir,) = run.iterdir()
    for name in ("quickstart.json", "quickstart.md", "loss.png", "manifest.json"):
        assert (run_dir / name).is_file()
    assert summary["val_loss_after"] < summary["val_loss_before"]
    assert len(summary["answers"]) == 8
