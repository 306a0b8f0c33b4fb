"""Ollama export: the translated Go template renders exactly what the Jinja chat template renders.

The Go side runs real Go text/template (tests/assets/gorender/main.go, built with the system `go`),
filled the way Ollama fills it; the Jinja side is transformers' own renderer."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tunelab.errors import ModelError
from tunelab.exporters.go_template import render_jinja, translate

ASSETS = Path(__file__).parent / "assets"
TEMPLATES = ASSETS / "chat_templates"

# file -> (bos, eos, family we expect to recognise)
CASES = {
    "chatml.jinja": ("<s>", "<|im_end|>", "chatml"),
    "Qwen-Qwen2.5-7B-Instruct.jinja": ("", "<|im_end|>", "chatml"),
    "smollm2": ("<|im_start|>", "<|im_end|>", "chatml"),
    "llama-3-instruct.jinja": ("<|begin_of_text|>", "<|eot_id|>", "llama3"),
    "meta-llama-Llama-3.2-3B-Instruct.jinja": ("<|begin_of_text|>", "<|eot_id|>", "llama3"),
    "mistral-instruct.jinja": ("<s>", "</s>", "mistral"),
    "mistral_v3.jinja": ("<s>", "</s>", "mistral"),
    "mistral_v7.jinja": ("<s>", "</s>", "mistral"),
    "mistralai-Mistral-Nemo-Instruct-2407.jinja": ("<s>", "</s>", "mistral"),
    "gemma-it.jinja": ("<bos>", "<eos>", "gemma"),
    "google-gemma-2-2b-it.jinja": ("<bos>", "<eos>", "gemma"),
    "gemma-3_chat_template.json": ("<bos>", "<eos>", "gemma"),
    "phi-3.jinja": ("<s>", "<|endoftext|>", "phi3"),
    "microsoft-Phi-3.5-mini-instruct.jinja": ("<s>", "<|endoftext|>", "phi3"),
    "phi-4-mini_tokenizer_config.json": ("<|endoftext|>", "<|endoftext|>", "phi3"),
    "llama-2-chat.jinja": ("<s>", "</s>", "llama2"),
    "zephyr.jinja": ("<s>", "</s>", "zephyr"),
}

# Mistral-Nemo's template puts the system prompt into the final message only if that is a user
# message, so it drops the system prompt when the conversation ends with an assistant message.
PREFILL_DROPS_SYSTEM = {"mistralai-Mistral-Nemo-Instruct-2407.jinja"}

SYSTEM = "You are a terse assistant. Answer in one line."
TURNS = ['What is 2+2? Say "four".', "four", "And {{ .Prompt }} times 3?\nThink first.", "twelve — 12 ✓",
         "Thanks! Bye."]


def load_template(name: str) -> str:
    if name == "smollm2":
        return (ASSETS / "smollm2_tokenizer" / "chat_template.jinja").read_text()
    text = (TEMPLATES / name).read_text()
    if name.endswith(".json"):
        return json.loads(text)["chat_template"]
    if "\n    " in text and name in ("chatml.jinja", "llama-3-instruct.jinja", "mistral-instruct.jinja",
                                    "gemma-it.jinja", "phi-3.jinja", "llama-2-chat.jinja", "zephyr.jinja"):
        # chujiezheng/chat_templates are indented for reading; their README strips it before use
        text = text.replace("    ", "").replace("\n", "")
    return text


def conv(n_turns: int, system: bool) -> list:
    msgs = [{"role": "system", "content": SYSTEM}] if system else []
    return msgs + [{"role": "user" if i % 2 == 0 else "assistant", "content": TURNS[i]} for i in range(n_turns)]


@pytest.fixture(scope="session")
def gorender(tmp_path_factory):
    """Render a batch of cases with real Go text/template; skips if Go is not installed."""
    go = shutil.which("go")
    if go is None:
        if os.environ.get("TUNELAB_REQUIRE_GO"):
            pytest.fail("TUNELAB_REQUIRE_GO is set but Go is not installed (apt-get install -y golang-go)")
        pytest.skip("Go is not installed (apt-get install -y golang-go)")
    tmp = tmp_path_factory.mktemp("gorender")
    env = dict(os.environ)
    if not env.get("HOME") and not env.get("GOCACHE"):
        env["GOCACHE"] = str(tmp / "cache")  # go needs a build cache; CI containers may have no HOME
    out = tmp / "gorender"
    subprocess.run([go, "build", "-o", str(out), str(ASSETS / "gorender" / "main.go")], check=True,
                   capture_output=True, env=env)

    def render(cases: list) -> list:
        proc = subprocess.run([str(out)], input=json.dumps(cases), capture_output=True, text=True, check=True)
        results = json.loads(proc.stdout)
        errors = [r["error"] for r in results if "error" in r]
        assert not errors, errors
        return [r["text"] for r in results]

    return render


@pytest.mark.parametrize("name", sorted(CASES))
def test_go_template_renders_like_jinja(name, gorender):
    bos, eos, family = CASES[name]
    source = load_template(name)
    tpl = translate(source, bos_token=bos, eos_token=eos)
    assert tpl.family == family
    assert eos in tpl.stop

    def jinja(messages, gen=True):
        return render_jinja(source, messages, add_generation_prompt=gen, bos_token=bos, eos_token=eos)

    cases, want = [], []
    # generation: the conversation ends with a user turn; Ollama adds the generation prompt
    systems = (False, True) if tpl.system != "unsupported" else (False,)
    for system in systems:
        for n in (1, 3, 5):
            cases.append({"template": tpl.template, "messages": conv(n, system)})
            want.append(jinja(conv(n, system)))
    if tpl.system != "unsupported":
        # Modelfile SYSTEM: Ollama prepends it when the request has no system message
        cases.append({"template": tpl.template, "messages": conv(3, False), "system": SYSTEM})
        want.append(jinja(conv(3, True)))
    # prefill: a final assistant message is continued, so the text stops right after its content
    for system in systems:
        full = jinja(conv(4, system), gen=False)
        if system and name in PREFILL_DROPS_SYSTEM:
            assert SYSTEM not in full  # the Jinja template's own quirk; Ollama's keeps the system prompt
            continue
        cases.append({"template": tpl.template, "messages": conv(4, system)})
        want.append(full[:full.rindex(TURNS[3]) + len(TURNS[3])])
    got = gorender(cases)
    for case, g, w in zip(cases, got, want):
        assert g == w, (name, case["messages"], case.get("system"))


def test_template_without_system_support_still_takes_a_system_prompt(gorender):
    """Gemma-2 rejects system messages; Ollama users may still send one: it leads the first user turn."""
    tpl = translate(load_template("google-gemma-2-2b-it.jinja"), bos_token="<bos>", eos_token="<eos>")
    assert tpl.system == "unsupported" and tpl.notes
    [text] = gorender([{"template": tpl.template, "messages": conv(1, True)}])
    assert text == f"<bos><start_of_turn>user\n{SYSTEM}\n\n{TURNS[0]}<end_of_turn>\n<start_of_turn>model\n"


def test_system_placement_is_recognised():
    assert translate(load_template("mistral_v3.jinja"), "<s>", "</s>").system == "last_user"
    assert translate(load_template("mistral_v7.jinja"), "<s>", "</s>").system == "first"
    assert translate(load_template("llama-2-chat.jinja"), "<s>", "</s>").system == "first"


def test_stop_tokens_are_end_of_turn_markers():
    assert translate(load_template("smollm2"), "<|im_start|>", "<|im_end|>").stop == ["<|im_start|>", "<|im_end|>"]
    assert translate(load_template("llama-3-instruct.jinja"), "<|begin_of_text|>", "<|end_of_text|>").stop == [
        "<|eot_id|>", "<|start_header_id|>", "<|end_of_text|>"]
    assert translate(load_template("llama-2-chat.jinja"), "<s>", "</s>").stop == ["[INST]", "</s>"]
    gemma = translate(load_template("gemma-it.jinja"), "<bos>", "<eos>", special_tokens=["<start_of_turn>",
                                                                                         "<end_of_turn>"])
    assert gemma.stop == ["<end_of_turn>", "<start_of_turn>", "<eos>"]


def test_dated_template_is_noted():
    tpl = translate(load_template("meta-llama-Llama-3.2-3B-Instruct.jinja"), "<|begin_of_text|>", "<|eot_id|>")
    assert any("today's date" in n for n in tpl.notes)


def test_trimming_template_is_noted():
    assert any("trims" in n for n in translate(load_template("chatml.jinja"), "<s>", "</s>").notes)
    assert not translate(load_template("smollm2"), "<|im_start|>", "<|im_end|>").notes


@pytest.mark.parametrize("source, match", [
    ("{% for m in messages %}{{ m.content | upper }}{% endfor %}", "verbatim"),
    ("{% for m in messages %}{% if loop.index0 == 4 %}<x>{% endif %}{{ m.role }}: {{ m.content }}\n{% endfor %}",
     "not turn-based"),
    ("", "no chat template"),
    ("{{ raise_exception('tools are required') }}", "fails on a plain"),
])
def test_untranslatable_templates_fail_clearly(source, match):
    with pytest.raises(ModelError, match=match):
        translate(source, "<s>", "</s>")


# --- export_ollama ---------------------------------------------------------------------------
# Until the GGUF exporter lands, export_gguf is replaced by a stand-in that writes a dummy file
# (test_export_ollama_real_gguf below runs the real one when it is there).

import sys  # noqa: E402
import types  # noqa: E402

import tunelab  # noqa: E402
from tunelab.cli import main  # noqa: E402
from tunelab.exporters.ollama import export_ollama, model_name, ollama_command  # noqa: E402


@pytest.fixture
def fake_gguf(monkeypatch):
    calls = []

    def export_gguf(model_ref, out, quant="q4_k_m", check=True):
        calls.append((str(model_ref), Path(out), quant, check))
        Path(out).write_bytes(b"GGUF-dummy")
        return Path(out)

    module = types.ModuleType("tunelab.exporters.gguf")
    module.export_gguf = export_gguf
    monkeypatch.setitem(sys.modules, "tunelab.exporters.gguf", module)
    return calls


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-step LoRA run on the tiny model, with a system prompt in its data config."""
    from conftest import SENTIMENT_ROWS, make_tiny_model, write_jsonl

    tmp = tmp_path_factory.mktemp("ollama_run")
    model = make_tiny_model(tmp / "model")
    data = write_jsonl(tmp / "data.jsonl", SENTIMENT_ROWS)
    cfg = {"name": "Tiny Sentiment", "output_dir": str(tmp / "runs"), "seed": 0,
           "model": {"ref": str(model), "dtype": "fp32"},
           "data": {"train": str(data), "val_fraction": 0.0, "max_seq_len": 64, "system_prompt": SYSTEM},
           "lora": {"rank": 2, "alpha": 4, "dropout": 0.0},
           "train": {"max_steps": 2, "micro_batch_size": 2, "grad_accum_steps": 1, "learning_rate": 1e-2,
                     "eval_every_n_steps": 0, "save_every_n_steps": 0, "warmup_steps": 0}}
    return tunelab.train(cfg, quiet=True).run_dir


def modelfile_parts(text: str) -> dict:
    """TEMPLATE / SYSTEM / LICENSE bodies, FROM and the stop list of a Modelfile we wrote."""
    def body(keyword):
        start = text.find(f'\n{keyword} """')
        if start < 0:
            return None
        start += len(keyword) + 5
        return text[start:text.index('"""', start)]
    lines = text.splitlines()
    return {"from": [ln for ln in lines if ln.startswith("FROM ")], "template": body("TEMPLATE"),
            "system": body("SYSTEM"), "license": body("LICENSE"),
            "stop": [ln.split(" ", 2)[2].strip('"') for ln in lines if ln.startswith("PARAMETER stop ")]}


def test_export_ollama_writes_gguf_and_modelfile(tiny_run, tmp_path, fake_gguf, gorender):
    out = export_ollama(str(tiny_run), tmp_path / "ollama", quant="q8_0")
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.gguf", "tunelab_ollama.json"]
    assert fake_gguf == [(str(tiny_run), fake_gguf[0][1], "q8_0", True)]
    assert fake_gguf[0][1].name == "model.gguf" and fake_gguf[0][1].parent != out  # written in the temp folder
    parts = modelfile_parts((out / "Modelfile").read_text())
    assert parts["from"] == ["FROM ./model.gguf"]
    assert parts["system"] == SYSTEM
    assert parts["stop"] == ["<|im_start|>", "<|im_end|>"]
    info = json.loads((out / "tunelab_ollama.json").read_text())
    assert info["family"] == "chatml" and info["name"] == "tiny-sentiment"
    assert ollama_command(out) == f"ollama create tiny-sentiment -f {out / 'Modelfile'}"
    # the TEMPLATE in the file, run by Go as Ollama runs it with the Modelfile's SYSTEM, gives the
    # exact text the run trained on (the tokenizer's own chat template with the run's system prompt)
    from tunelab.models import load_tokenizer

    tok = load_tokenizer(ASSETS / "smollm2_tokenizer")
    msgs = conv(3, False)
    [text] = gorender([{"template": parts["template"], "messages": msgs, "system": parts["system"]}])
    assert text == tok.apply_chat_template(conv(3, True), tokenize=False, add_generation_prompt=True)


def test_export_ollama_is_atomic(tiny_run, tmp_path, fake_gguf, monkeypatch):
    def broken(model_ref, out, quant="q4_k_m", check=True):
        Path(out).write_bytes(b"half")
        raise ModelError("parity check failed")

    monkeypatch.setattr(sys.modules["tunelab.exporters.gguf"], "export_gguf", broken)
    (tmp_path / "ollama").mkdir()
    (tmp_path / "ollama" / "Modelfile").write_text("old\n")
    with pytest.raises(ModelError, match="parity"):
        export_ollama(str(tiny_run), tmp_path / "ollama")
    assert [p.name for p in tmp_path.iterdir()] == ["ollama"]  # no temp folder left behind
    assert (tmp_path / "ollama" / "Modelfile").read_text() == "old\n"  # the previous export is intact


def test_export_ollama_refuses_an_untranslatable_template_before_converting(tiny_model_dir, tmp_path, fake_gguf):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content | upper }}{% endfor %}")
    with pytest.raises(ModelError, match="Ollama template"):
        export_ollama(str(model), tmp_path / "ollama")
    assert fake_gguf == [] and not (tmp_path / "ollama").exists()


def test_export_ollama_from_the_cli(tiny_run, tmp_path, fake_gguf, capsys):
    out = tmp_path / "ollama"
    assert main(["export", str(tiny_run), "--format", "ollama", "--quant", "f16", "--out", str(out)]) == 0
    shown = capsys.readouterr().out
    assert f"ollama create tiny-sentiment -f {out / 'Modelfile'}" in shown
    assert fake_gguf[0][2] == "f16" and (out / "model.gguf").is_file()


def test_model_names():
    assert model_name("runs/My Run-20260101-120000/final") == "my-run-20260101-120000"
    assert model_name("runs/r1/checkpoint-8") == "r1-checkpoint-8"
    assert model_name("smollm2-135m-instruct") == "smollm2-135m-instruct"
    assert model_name("/models/Foo.gguf") == "foo"


def test_modelfile_quotes_are_safe():
    from tunelab.exporters.go_template import translate
    from tunelab.exporters.ollama import render_modelfile

    tpl = translate(load_template("smollm2"), "<|im_start|>", "<|im_end|>")
    assert '"""' not in tpl.template
    text = render_modelfile(tpl, system_prompt='Say "yes".', license_text="MIT")
    assert modelfile_parts(text)["system"] == 'Say "yes".' and modelfile_parts(text)["license"] == "MIT"
    with pytest.raises(tunelab.TunelabError, match='"""'):
        render_modelfile(tpl, system_prompt='a """ b')


def test_export_ollama_real_gguf(tiny_run, tmp_path, gorender):
    """The real GGUF exporter (llama.cpp converter + parity check) under the Modelfile: the GGUF carries
    the same chat template, and every stop string is one token of the GGUF's vocabulary."""
    pytest.importorskip("llama_cpp")
    try:
        import tunelab.exporters.gguf  # noqa: F401
    except ImportError:
        pytest.skip("the GGUF exporter is not on this branch yet")
    import gguf

    out = export_ollama(str(tiny_run), tmp_path / "ollama", quant="f16")
    reader = gguf.GGUFReader(str(out / "model.gguf"))

    def field(key):
        f = reader.fields[key]
        return [bytes(f.parts[i]).decode() for i in f.data]

    vocab = set(field("tokenizer.ggml.tokens"))
    parts = modelfile_parts((out / "Modelfile").read_text())
    assert parts["stop"] and all(stop in vocab for stop in parts["stop"])
    from tunelab.models import load_tokenizer

    tok = load_tokenizer(ASSETS / "smollm2_tokenizer")
    assert field("tokenizer.chat_template") == [tok.chat_template]
