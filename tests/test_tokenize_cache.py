"""The tokenized cache: a second prepare reads what the first wrote, any change to the inputs
misses, and a damaged entry is rebuilt instead of stopping a run."""

import json
from dataclasses import asdict, replace

import pytest

import tunelab
from tunelab.config.schema import DataConfig
from tunelab.data import cache
from tunelab.data.prepare import prepare_data


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "tokenized"


def data_cfg(path, **kw) -> DataConfig:
    return replace(DataConfig(), train=str(path), val_fraction=0.25, max_seq_len=128, **kw)


def same_data(a, b) -> bool:
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith("tokenized_cache")}  # noqa: E731
    return (a.train == b.train and a.val == b.val and a.train_examples == b.train_examples
            and a.val_examples == b.val_examples and strip(a.report) == strip(b.report))


def test_second_prepare_hits_the_cache_with_identical_examples(cache_dir, sentiment_file, tokenizer):
    cold = prepare_data(data_cfg(sentiment_file), tokenizer, seed=0)
    assert cold.report["tokenized_cache"] == "miss"
    (entry,) = cache_dir.iterdir()
    assert sorted(p.name for p in entry.iterdir()) == ["arrays.npz", "manifest.json", "meta.json"]
    warm = prepare_data(data_cfg(sentiment_file), tokenizer, seed=0)
    assert warm.report["tokenized_cache"] == "hit"
    assert same_data(cold, warm) and len(warm.train) == 9 and len(warm.val) == 3
    assert any(e.labels[-1] != -100 for e in warm.train)  # the loss mask came back, not just the ids
    assert not list(cache_dir.glob(".*tmp*")), "temporary folder left behind"


@pytest.mark.parametrize("change", ["max_seq_len", "template", "seed", "data bytes", "train_on_prompt"])
def test_any_change_to_the_inputs_misses(cache_dir, sentiment_file, tokenizer, change):
    cfg, tok, seed = data_cfg(sentiment_file), tokenizer, 0
    prepare_data(cfg, tok, seed)
    if change == "max_seq_len":
        cfg = replace(cfg, max_seq_len=24)
    elif change == "template":
        from conftest import TOKENIZER_DIR

        from tunelab.models import load_tokenizer

        tok = load_tokenizer(TOKENIZER_DIR, chat_template="alpaca")
    elif change == "seed":
        seed = 1
    elif change == "data bytes":
        sentiment_file.write_text(sentiment_file.read_text().replace("Great food", "Good food"))
    else:
        cfg = replace(cfg, train_on_prompt=True)
    again = prepare_data(cfg, tok, seed)
    assert again.report["tokenized_cache"] == "miss"
    assert len(list(cache_dir.iterdir())) == 2
    fresh = prepare_data(replace(cfg, cache=False), tok, seed)  # and what it built is what no cache builds
    assert fresh.report["tokenized_cache"] == "off" and same_data(again, fresh)


@pytest.mark.parametrize("damage", ["flipped byte", "truncated arrays", "no meta", "bad manifest", "wrong sizes"])
def test_a_damaged_entry_is_rebuilt_not_a_crash(cache_dir, sentiment_file, tokenizer, damage):
    cold = prepare_data(data_cfg(sentiment_file), tokenizer, seed=0)
    (entry,) = cache_dir.iterdir()
    arrays = entry / "arrays.npz"
    if damage == "flipped byte":
        raw = bytearray(arrays.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        arrays.write_bytes(bytes(raw))
    elif damage == "truncated arrays":
        arrays.write_bytes(arrays.read_bytes()[:100])
    elif damage == "no meta":
        (entry / "meta.json").unlink()
    elif damage == "bad manifest":
        (entry / "manifest.json").write_text("{not json")
    else:  # consistent checksums, inconsistent content: one source too many
        meta = json.loads((entry / "meta.json").read_text())
        meta["train_sources"].append("extra:1")
        (entry / "meta.json").write_text(json.dumps(meta))
        manifest = json.loads((entry / "manifest.json").read_text())
        manifest["sha256"]["meta.json"] = cache._sha256(entry / "meta.json")
        (entry / "manifest.json").write_text(json.dumps(manifest))
    rebuilt = prepare_data(data_cfg(sentiment_file), tokenizer, seed=0)
    assert rebuilt.report["tokenized_cache"] == "miss" and str(entry) in rebuilt.report["tokenized_cache_rebuilt"]
    assert same_data(cold, rebuilt)
    healed = prepare_data(data_cfg(sentiment_file), tokenizer, seed=0)
    assert healed.report["tokenized_cache"] == "hit" and "tokenized_cache_rebuilt" not in healed.report
    assert same_data(cold, healed)


def test_an_unwritable_cache_does_not_stop_the_run(tmp_path, monkeypatch, sentiment_file, tokenizer):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("TUNELAB_CACHE", str(blocker))
    data = prepare_data(data_cfg(sentiment_file), tokenizer, seed=0)
    assert data.report["tokenized_cache"] == "miss" and "tokenized_cache_error" in data.report
    assert len(data.train) == 9


def test_the_cache_can_be_turned_off(cache_dir, sentiment_file, tokenizer):
    data = prepare_data(data_cfg(sentiment_file, cache=False), tokenizer, seed=0)
    assert data.report["tokenized_cache"] == "off" and not cache_dir.exists()


def test_the_key_covers_every_data_setting(sentiment_file, tokenizer):
    """A new data.* field changes the key without anyone remembering to add it (only `cache` is left out)."""
    base = data_cfg(sentiment_file)
    key = cache.cache_key(base, tokenizer, 0)
    for name, value in asdict(base).items():
        if name in ("cache", "train"):
            continue
        other = {"columns": {"output": "answer"}, "system_prompt": "Be brief.", "limit": 3,
                 "validation": str(sentiment_file)}.get(name)
        if other is None:
            other = (not value) if isinstance(value, bool) else (value + 1 if isinstance(value, (int, float)) else "x")
        assert cache.cache_key(replace(base, **{name: other}), tokenizer, 0) != key, name
    assert cache.cache_key(replace(base, cache=False), tokenizer, 0) == key


def test_second_training_run_logs_the_hit_and_trains_the_same(cache_dir, tiny_config, capsys):
    first = tunelab.train(tiny_config, quiet=True)
    assert "tokenized cache hit" not in capsys.readouterr().out
    second = tunelab.train(tiny_config, quiet=True)
    assert "tokenized cache hit" in capsys.readouterr().out
    reports = [json.loads((r.run_dir / "data_report.json").read_text()) for r in (first, second)]
    assert [r["tokenized_cache"] for r in reports] == ["miss", "hit"]
    assert second.val_loss_before == pytest.approx(first.val_loss_before, rel=1e-6)
    assert second.val_loss_after == pytest.approx(first.val_loss_after, rel=1e-5)
