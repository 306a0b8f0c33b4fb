"""The CLI is thin: it parses, calls the API, and prints errors without a traceback."""

import json
import subprocess
import sys

from tunelab.cli import main


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "tunelab.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_config_error_is_one_clear_message(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  train: x.jsonl\ntrain:\n  max_stpes: 5\n")
    r = run_cli("train", str(cfg))
    assert r.returncode == 2
    assert "did you mean train.max_steps" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr


def test_data_error_names_file_and_line(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "b"\n')
    r = run_cli("data", "inspect", str(bad), "--model", str(tiny_model_dir))
    assert r.returncode == 2 and "bad.jsonl:2" in r.stdout and "invalid JSON" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr


def test_unknown_model_gives_the_known_aliases():
    r = run_cli("chat", "smollm2-135m-instruc")
    assert r.returncode == 2 and "did you mean 'smollm2-135m-instruct'" in r.stdout


def test_data_inspect_reports_format_lengths_and_marks_trained_tokens(sentiment_file, tiny_model_dir, capsys):
    assert main(["data", "inspect", str(sentiment_file), "--model", str(tiny_model_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "alpaca" and report["rows"] == 12
    assert report["train_token_lengths"]["max"] > report["train_token_lengths"]["min"] > 0
    trained = "".join(p for p, t in report["example"]["segments"] if t)
    assert trained == "positive<|im_end|>\n"


def test_train_generate_export_chat_from_the_cli(tiny_config, tmp_path, capsys, monkeypatch):
    import yaml

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config))
    assert main(["train", str(cfg), "--set", "train.max_steps=2", "--set", "lora.rank=2", "--quiet"]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    assert "rank: 2" in (run / "config.yaml").read_text()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hello"}\n{"instruction": "Label it.", "input": "Great!", "output": "positive"}\n')
    out = tmp_path / "answers.jsonl"
    assert main(["generate", str(run), "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "4"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and rows[1]["reference"] == "positive" and "answer" in rows[0]
    assert main(["export", str(run), "--format", "merged", "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    inputs = iter(["hi", "/reset", "hello again", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(inputs))
    assert main(["chat", str(run), "--max-new-tokens", "3"]) == 0
    shown = capsys.readouterr().out
    assert shown.count("model> ") == 2 and "(conversation cleared)" in shown
