"""Shared fixtures: a tiny random Llama on SmolLM2's real tokenizer, small data files."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

ASSETS = Path(__file__).parent / "assets"
SRC = Path(__file__).resolve().parents[1] / "src"
# subprocesses (`python -m tunelab.cli`, torchrun) test this tree's code, not whatever is installed
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
TOKENIZER_DIR = ASSETS / "smollm2_tokenizer"


def _private_cache() -> None:
    """Every tunelab cache of this test session (tokenized data above all: the code under test
    decides what it holds) goes to a temporary folder, for this process and its subprocesses.
    Only the dequantized GGUF models stay shared with the user's cache: a conversion takes ~20 s
    and depends on the .gguf file alone."""
    import atexit
    import tempfile

    if Path(os.environ.get("TUNELAB_CACHE", "")).name.startswith("tunelab-test-cache-"):
        return  # set already (conftest imported a second time as tests.conftest, or a subprocess)
    user = Path(os.environ.get("TUNELAB_CACHE", Path.home() / ".cache" / "tunelab"))
    private = Path(tempfile.mkdtemp(prefix="tunelab-test-cache-"))
    try:
        (user / "gguf").mkdir(parents=True, exist_ok=True)
        (private / "gguf").symlink_to(user / "gguf", target_is_directory=True)
    except OSError:
        pass  # no writable home: the models are converted into the private folder instead
    os.environ["TUNELAB_CACHE"] = str(private)
    atexit.register(shutil.rmtree, private, True)  # rmtree unlinks the gguf link, never what it points to


_private_cache()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def full_config(tiny_config: dict, name: str, **train) -> dict:
    """tiny_config as a full fine-tuning run named `name` (lr 1e-3, no validation split); train
    keys override."""
    return {**tiny_config, "method": "full", "name": name, "data": {**tiny_config["data"], "val_fraction": 0},
            "train": {**tiny_config["train"], "learning_rate": 1e-3, **train}}


def train_until_first_checkpoint(config: dict) -> None:
    """Start a run that dies right after writing its first checkpoint (as a crash or a killed job
    would), so a test can then resume it."""
    import tunelab
    import tunelab.training.checkpoint as ckpt

    class Crash(Exception):
        pass

    original = ckpt.save_checkpoint

    def save_then_die(*args, **kwargs):
        original(*args, **kwargs)
        raise Crash

    ckpt.save_checkpoint = save_then_die
    try:
        with pytest.raises(Crash):
            tunelab.train(config, quiet=True)
    finally:
        ckpt.save_checkpoint = original


def make_tiny_model(folder: Path, seed: int = 0, layers: int = 2, hidden: int = 32) -> Path:
    """A 2-layer random Llama (hidden 32) with SmolLM2's tokenizer saved beside it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2,
                         initializer_range=0.1)  # larger than usual: logits far from uniform, so a few steps visibly learn
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    for f in TOKENIZER_DIR.iterdir():
        if f.suffix in (".json", ".jinja"):
            shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def tiny64_dir(tmp_path_factory) -> Path:
    # bitsandbytes' CPU 4-bit kernels quantize in blocks of 64 along the input dim: hidden 32 is too narrow
    return make_tiny_model(tmp_path_factory.mktemp("tiny64"), hidden=64)


@pytest.fixture(scope="session")
def tokenizer():
    from tunelab.models import load_tokenizer

    return load_tokenizer(TOKENIZER_DIR)


SENTIMENT_ROWS = [
    {"instruction": "Label the sentiment.", "input": text, "output": label}
    for text, label in [
        ("Great food and friendly staff.", "positive"), ("The battery died after a day.", "negative"),
        ("I loved every minute of this film.", "positive"), ("Terrible service, never again.", "negative"),
        ("Works perfectly, highly recommend.", "positive"), ("The plot was boring and slow.", "negative"),
        ("Best pizza in town!", "positive"), ("It broke the first time I used it.", "negative"),
        ("A wonderful, moving story.", "positive"), ("Cold fries and a rude waiter.", "negative"),
        ("Sound quality is excellent.", "positive"), ("Waste of money.", "negative"),
    ]
]


@pytest.fixture
def sentiment_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "sentiment.jsonl", SENTIMENT_ROWS)


@pytest.fixture
def tiny_config(tiny_model_dir, sentiment_file, tmp_path) -> dict:
    """A LoRA run on the tiny model that takes a second or two."""
    return {
        "name": "tiny", "output_dir": str(tmp_path / "runs"), "seed": 0,
        "model": {"ref": str(tiny_model_dir), "dtype": "fp32"},
        "data": {"train": str(sentiment_file), "val_fraction": 0.25, "max_seq_len": 128},
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 4, "micro_batch_size": 2, "grad_accum_steps": 2, "learning_rate": 1e-2,
                  "eval_every_n_steps": 0, "save_every_n_steps": 0, "warmup_steps": 0},
    }

