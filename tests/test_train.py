"""Training on a tiny random Llama: artifacts, loss, accumulation = large batch, resume = straight run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tunelab
from conftest import train_until_first_checkpoint
from tunelab.errors import DataError, RunError
from tunelab.runs import read_metrics


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def test_lora_run_writes_the_run_directory_contract(tiny_config):
    result = tunelab.train(tiny_config, quiet=True)
    run = result.run_dir
    for name in ("config.yaml", "manifest.json", "metrics.jsonl", "data_report.json", "loss.png"):
        assert (run / name).is_file(), name
    final = run / "final"
    assert (final / "adapter_model.safetensors").is_file() and (final / "adapter_config.json").is_file()
    assert (final / "tokenizer.json").is_file()
    assert not list(run.glob(".*tmp*")), "temporary files left behind"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["steps"] == 4 and len(manifest["data"]["train_sha256"]) == 64
    assert manifest["versions"]["torch"] and manifest["seed"] == 0
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_config["model"]["ref"]
    report = json.loads((run / "data_report.json").read_text())
    assert report["format"] == "alpaca" and report["train_examples"] == 9 and report["val_examples"] == 3
    assert len(losses(run)) == 4 and result.val_loss_before is not None
    # training throughput leaves validation time out, and no more than that
    per_step = [r["tokens_per_s"] for r in read_metrics(run) if "loss" in r]
    assert 0 < manifest["tokens_per_s"] <= 1.5 * max(per_step)
    assert manifest["eval_seconds"] > 0


def test_tokens_per_second_counts_the_examples_tokens_not_the_filler(tiny_config):
    """One step over all 12 examples: the step's tokens are the data's, though the packed row is
    longer (bucketed)."""
    cfg = {**tiny_config, "data": {**tiny_config["data"], "val_fraction": 0},
           "train": {**tiny_config["train"], "max_steps": 1, "micro_batch_size": 12, "grad_accum_steps": 1}}
    run = tunelab.train(cfg, quiet=True).run_dir
    report = json.loads((run / "data_report.json").read_text())
    step = [r for r in read_metrics(run) if "loss" in r][0]
    assert step["tokens"] == report["train"]["tokens"]
    assert step["target_tokens"] == report["train"]["target_tokens"]


def test_training_lowers_the_loss(tiny_config):
    cfg = {**tiny_config, "train": {**tiny_config["train"], "max_steps": 12}, "data": {**tiny_config["data"], "val_fraction": 0}}
    result = tunelab.train(cfg, quiet=True)
    curve = losses(result.run_dir)
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3 - 0.5  # ~10.7 -> ~9.7 with these settings


def test_full_fine_tuning_saves_safetensors_that_load(tiny_config):
    cfg = {**tiny_config, "method": "full", "train": {**tiny_config["train"], "learning_rate": 1e-4}}
    result = tunelab.train(cfg, quiet=True)
    assert (result.run_dir / "final" / "model.safetensors").is_file()
    model, tok = tunelab.load_model(str(result.run_dir), dtype="fp32")
    assert not hasattr(model, "peft_config")
    assert tok.chat_template


def test_accumulation_equals_the_large_batch(tiny_config):
    """2 micro batches of 2 == 1 micro batch of 4: the loss is normalised over the whole step's answer tokens."""
    base = {**tiny_config, "data": {**tiny_config["data"], "val_fraction": 0}}
    a = tunelab.train({**base, "train": {**base["train"], "micro_batch_size": 2, "grad_accum_steps": 2}}, quiet=True)
    b = tunelab.train({**base, "train": {**base["train"], "micro_batch_size": 4, "grad_accum_steps": 1}}, quiet=True)
    # same examples per step (the order is seeded), so identical losses and weights
    assert losses(a.run_dir) == pytest.approx(losses(b.run_dir), rel=1e-4)
    from safetensors.torch import load_file

    wa = load_file(a.run_dir / "final" / "adapter_model.safetensors")
    wb = load_file(b.run_dir / "final" / "adapter_model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_resume_continues_with_the_same_losses(tiny_config):
    base = {**tiny_config, "train": {**tiny_config["train"], "max_steps": 6, "save_every_n_steps": 3},
            "lora": {**tiny_config["lora"], "dropout": 0.1}}  # dropout: masks hashed by micro batch
    straight = losses(tunelab.train({**base, "name": "straight"}, quiet=True).run_dir)
    train_until_first_checkpoint({**base, "name": "resumed"})  # dies after its step-3 checkpoint
    result = tunelab.train({**base, "name": "resumed"}, resume=True, quiet=True)
    assert result.steps == 6
    assert losses(result.run_dir) == pytest.approx(straight, rel=1e-5)


def test_a_checkpoint_with_an_empty_param_group_still_resumes(tiny_config, tmp_path):
    """LoRA checkpoints written before empty param groups were left out (it trains no norms or
    biases) hold a second, empty group in optimizer.pt and scheduler.pt."""
    from tunelab.training.checkpoint import latest_checkpoint

    base = {**tiny_config, "train": {**tiny_config["train"], "max_steps": 6, "save_every_n_steps": 3}}
    straight = losses(tunelab.train({**base, "name": "straight"}, quiet=True).run_dir)
    train_until_first_checkpoint({**base, "name": "resumed"})
    (run,) = (tmp_path / "runs").glob("resumed-*")
    step3 = latest_checkpoint(run)
    opt, sched = torch.load(step3 / "optimizer.pt"), torch.load(step3 / "scheduler.pt")
    assert len(opt["param_groups"]) == 1
    opt["param_groups"].append({**opt["param_groups"][0], "params": [], "weight_decay": 0.0})
    for key in ("base_lrs", "_last_lr", "lr_lambdas"):
        sched[key].append(sched[key][0])
    torch.save(opt, step3 / "optimizer.pt")
    torch.save(sched, step3 / "scheduler.pt")
    result = tunelab.train({**base, "name": "resumed"}, resume=True, quiet=True)
    assert losses(result.run_dir) == pytest.approx(straight, rel=1e-5)


def test_ctrl_c_saves_a_checkpoint_that_resumes(tiny_config, monkeypatch):
    import tunelab.training.loop as loop

    calls = {"n": 0}
    original = loop.token_loss_sum

    def interrupt_on_third_step(model, batch, *args):
        calls["n"] += 1
        if calls["n"] == 2 * 2 + 1 + 2:  # 2 validation batches, then step 1 and 2 (2 micro each), then step 3
            raise KeyboardInterrupt
        return original(model, batch, *args)
    monkeypatch.setattr(loop, "token_loss_sum", interrupt_on_third_step)
    result = tunelab.train(tiny_config, quiet=True)
    assert result.interrupted and result.steps == 2
    assert (result.run_dir / "checkpoints" / "step-000002" / "trainer_state.json").is_file()
    assert not (result.run_dir / "manifest.json").exists()
    monkeypatch.setattr(loop, "token_loss_sum", original)
    resumed = tunelab.train(tiny_config, resume=True, quiet=True)
    assert resumed.run_dir == result.run_dir and resumed.steps == 4 and (resumed.run_dir / "manifest.json").exists()


def test_resume_without_a_run_is_a_clear_error(tiny_config):
    with pytest.raises(RunError, match="nothing to resume"):
        tunelab.train(tiny_config, resume=True, quiet=True)


def test_bad_data_stops_before_training_with_file_and_line(tiny_config, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": ""}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: .*empty"):
        tunelab.train({**tiny_config, "data": {**tiny_config["data"], "train": str(bad)}}, quiet=True)


def test_merged_export_matches_base_plus_adapter(tiny_config, tmp_path):
    from transformers import AutoModelForCausalLM

    result = tunelab.train({**tiny_config, "train": {**tiny_config["train"], "max_steps": 3}}, quiet=True)
    out = tunelab.export(str(result.run_dir), format="merged", out=tmp_path / "merged")
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not (out / "adapter_config.json").exists()
    with_adapter, _ = tunelab.load_model(str(result.run_dir), dtype="fp32")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([[1, 520, 9531, 198, 19556, 17, 2, 198, 4093]])
    with torch.no_grad():
        a = with_adapter(input_ids=ids).logits
        b = merged(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4)
    # the adapter must have changed something, or this test proves nothing
    base = AutoModelForCausalLM.from_pretrained(tiny_config["model"]["ref"], dtype=torch.float32)
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=ids).logits, b, atol=1e-4)


def test_compiled_decoder_computes_rope_outside_its_graph(tiny_model_dir):
    """cos and sin come from one eager call a step, not from sines inlined into every layer's kernels;
    the compiled model still gives the eager logits."""
    from transformers import AutoModelForCausalLM

    from tunelab.training.loop import compile_blocks

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    rope, calls = model.model.rotary_emb, []
    inner = rope.forward

    def spy(*args, **kwargs):  # runs at every call when eager; compiled in, only while tracing
        calls.append(torch.compiler.is_compiling())
        return inner(*args, **kwargs)

    rope.forward = spy
    ids = torch.tensor([[1, 5, 9, 200, 7, 3]])
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        compile_blocks(model)
        compiled = [model(input_ids=ids[:, :n]).logits for n in (6, 4, 6)]
    assert calls == [False] * 4
    assert torch.allclose(compiled[0], eager, atol=1e-5) and torch.allclose(compiled[1], eager[:, :4], atol=1e-5)


def test_compile_blocks_builds_one_graph_for_all_layers(tiny_model_dir):
    """Each decoder layer compiles on its own and all of them run one graph, so compile time does not
    grow with depth (the whole decoder as one graph built every layer again); the logits stay eager's."""
    import torch._dynamo
    from transformers import AutoModelForCausalLM

    from tunelab.training.loop import compile_blocks

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert len(model.model.layers) > 1
    ids = torch.tensor([[1, 5, 9, 200, 7, 3]])
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    with torch.no_grad():
        eager = model(input_ids=ids, use_cache=False).logits
        compile_blocks(model)
        compiled = model(input_ids=ids, use_cache=False).logits  # training's forward: no KV cache
    assert counters["stats"]["unique_graphs"] == 2  # the layers' graph and the final norm's
    assert torch.allclose(compiled, eager, atol=1e-5)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_checkpointed_layers_stay_compiled_and_give_eager_gradients(tiny_model_dir, method):
    """With gradient checkpointing a compiled layer runs the checkpoint inside its graph: no graph
    break (one sent every layer back to eager, measured: half the memory it saves lost), the
    backward's recompute in the graph, and the gradients of the eager, uncheckpointed model. LoRA with
    dropout: its hashed masks are the same compiled, eager and recomputed, and keep one graph."""
    import torch._dynamo
    from transformers import AutoModelForCausalLM

    from tunelab.config.schema import LoraConfig
    from tunelab.training.lora import apply_lora, set_dropout_batch
    from tunelab.training.loop import compile_blocks

    ids = torch.tensor([[1, 5, 9, 200, 7, 3, 11, 42]])

    def gradients(compiled: bool) -> dict:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        if method == "lora":
            model = apply_lora(model, LoraConfig(rank=4, alpha=8, dropout=0.3))
            for name, p in model.named_parameters():
                if "lora_B" in name:  # B starts at zero, which would leave A's gradients zero
                    torch.nn.init.normal_(p, std=0.1)
            set_dropout_batch(0, 7)
        model.train()
        if compiled:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            compile_blocks(model)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    expected, got = gradients(False), gradients(True)
    assert not counters["graph_break"], list(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 2  # the layers' graph and the final norm's
    for name, grad in expected.items():
        assert torch.allclose(got[name], grad, atol=1e-6, rtol=1e-4), name


def test_unknown_export_format_names_the_known_ones(tiny_config):
    with pytest.raises(tunelab.TunelabError, match="unknown; use one of: merged, gguf, gguf-adapter, ollama"):
        tunelab.export("whatever", format="onnx")


@pytest.mark.parametrize("method,dtype", [("lora", "fp32"), ("full", "bf16")])
def test_compiled_training_matches_eager(tiny_config, method, dtype):
    """Compiled runs use their own attention backward and loss kernels; the second step's loss checks
    the first step's gradients. bf16 full: fp32 weights under autocast (q, k in fp32 after rope, v bf16)."""
    base = {**tiny_config, "method": method, "model": {**tiny_config["model"], "dtype": dtype},
            "train": {**tiny_config["train"], "max_steps": 2, "learning_rate": 1e-3},
            "data": {**tiny_config["data"], "val_fraction": 0}}
    eager = losses(tunelab.train({**base, "train": {**base["train"], "compile": False}}, quiet=True).run_dir)
    compiled = tunelab.train({**base, "train": {**base["train"], "compile": True}}, quiet=True)
    assert eager[1] < eager[0]
    assert losses(compiled.run_dir) == pytest.approx(eager, rel=1e-4 if dtype == "fp32" else 1e-2)
    weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    assert (compiled.run_dir / "final" / weights).is_file()


def test_compiled_code_is_kept_with_tunelabs_caches_not_in_tmp(tmp_path):
    """torch.compile's cache defaults to /tmp, which a boot may empty: a training process keeps it in
    TUNELAB_CACHE/torch_compile instead, where torch's compiler then finds it; a TORCHINDUCTOR_CACHE_DIR
    already set wins. (A fresh process each: torch fixes the folder at its first compile.)"""
    probe = ("from tunelab.training.loop import keep_compiled_code; kept = keep_compiled_code(); "
             "from torch._inductor.runtime.cache_dir_utils import cache_dir; print(kept, cache_dir())")
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    for preset in (None, tmp_path / "mine"):
        run_env = dict(env, TUNELAB_CACHE=str(tmp_path / "cache"),
                       **({"TORCHINDUCTOR_CACHE_DIR": str(preset)} if preset else {}))
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=run_env, check=True)
        kept, used = out.stdout.split()
        assert kept == used == str(preset or tmp_path / "cache" / "torch_compile")
        assert Path(used).is_dir()


@pytest.mark.parametrize("fast_bf16", [False, True])
def test_bf16_on_a_cpu_without_a_bf16_unit_is_warned(tiny_config, monkeypatch, capsys, fast_bf16):
    """Without AVX512-BF16 or AMX a bf16 matmul runs at 1/50 of fp32's rate or less (AVX2 Zen 2): a run
    that asks for bf16 there says so before it starts; fp32 runs, and bf16 on a CPU fast at it, do not."""
    monkeypatch.setattr("tunelab.hardware.cpu_has_fast_bf16", lambda: fast_bf16)
    for dtype in ("bf16", "fp32"):
        config = {**tiny_config, "name": f"dtype-{dtype}", "model": {**tiny_config["model"], "dtype": dtype},
                  "train": {**tiny_config["train"], "max_steps": 1, "compile": False}}
        tunelab.train(config, quiet=True)
        warned = "no fast bf16 unit" in capsys.readouterr().out
        assert warned == (dtype == "bf16" and not fast_bf16), dtype
