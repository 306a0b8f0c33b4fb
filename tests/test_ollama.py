"""Ollama export: the translated Go template renders exactly what the Jinja chat template renders.

The Go side runs real Go text/template (tests/assets/gorender/main.go, built with the system `go`),
filled the way Ollama fills it; the Jinja side is transformers' own renderer."""

import json
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
        pytest.skip("Go is not installed (apt-get install -y golang-go)")
    out = tmp_path_factory.mktemp("gorender") / "gorender"
    subprocess.run([go, "build", "-o", str(out), str(ASSETS / "gorender" / "main.go")], check=True,
                   capture_output=True)

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
