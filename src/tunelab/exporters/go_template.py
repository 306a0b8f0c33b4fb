"""Translate a Hugging Face Jinja chat template into an Ollama Go text/template.

Jinja templates are programs; translating their source in general is brittle. Instead we render
probe conversations with the real template (transformers' own renderer, the one training used)
using sentinel contents, and read off the text the template puts around each message:

    header (no system)   ... U1   user->assistant   A1   assistant->user   U2   tail (generation prompt)
    header (system) ... S ... system->user ... U1 ...

That covers the turn-based families (ChatML, Llama-3, Phi-3, Zephyr, Gemma, Llama-2, Mistral,
Qwen, SmolLM2 ...): where the system prompt goes (own turn, merged into the first user turn, or
merged into the last user turn as Mistral v1/v3 do), a default system prompt the template adds,
the BOS text and the generation prompt. The Go template built from these pieces is then checked,
in Python, against the Jinja rendering of longer conversations; a template whose shape does not
fit (tool-call templates with dynamic dates, per-turn logic) fails with a clear error instead of
producing a silently wrong Modelfile.

The Go template iterates .Messages (Ollama's modern code path): Ollama collates all system
messages into .System and keeps them in .Messages, so the template skips role "system" in the loop
and places $.System itself. A conversation ending with a user message gets the generation prompt;
one ending with an assistant message is continued (Ollama's prefill), with no end-of-turn marker.
"""

import json
import re
import time
from dataclasses import dataclass, field

from tunelab.errors import ModelError

# Sentinel contents: plain ASCII words no template transforms and no tokenizer treats specially.
S, U1, A1, U2, A2, U3 = ("QqSYSTEMqQ", "QqUSER1qQ", "QqASSISTANT1qQ", "QqUSER2qQ", "QqASSISTANT2qQ", "QqUSER3qQ")

# Special-token shapes, used to pick stop strings when the tokenizer's own list is not given.
_SPECIAL = re.compile(r"<\|[^<>|\s]{1,40}\|>|<[a-z_/]{1,30}>|\[/?[A-Z_]{2,30}\]")


@dataclass
class OllamaTemplate:
    """An Ollama TEMPLATE with the stop strings that go with it."""
    family: str                 # human label: chatml, llama3, mistral, gemma, phi3, llama2, zephyr, turns
    template: str               # Go text/template source for the Modelfile
    stop: list = field(default_factory=list)
    system: str = "first"       # where the system prompt goes: first | last_user | unsupported
    notes: list = field(default_factory=list)


def render_jinja(chat_template: str, messages: list, add_generation_prompt: bool = True,
                 bos_token: str = "", eos_token: str = "") -> str:
    """Render like tokenizer.apply_chat_template (transformers' renderer, same Jinja settings)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template([messages], chat_template=chat_template,
                                        add_generation_prompt=add_generation_prompt,
                                        bos_token=bos_token, eos_token=eos_token)
    return rendered[0]


def _split(text: str, sentinels: list) -> "list | None":
    """Cut `text` at the sentinels (in this order); None if they are not there in order."""
    parts, pos = [], 0
    for s in sentinels:
        i = text.find(s, pos)
        if i < 0 or text.count(s) != 1:
            return None
        parts.append(text[pos:i])
        pos = i + len(s)
    parts.append(text[pos:])
    return parts


def _conv(*contents) -> list:
    roles = {"S": "system", "U": "user", "A": "assistant"}
    return [{"role": roles[c[2]], "content": c} for c in contents]


@dataclass
class _Shape:
    header: str              # before the first user message, no system prompt (may hold a default system)
    user_to_assistant: str
    assistant_to_user: str
    tail: str                # after the last user message: end of turn + generation prompt
    system: str              # first | last_user | unsupported
    sys_header: str = ""     # first: text before the system prompt
    sys_to_user: str = ""    # first: text between the system prompt and the first user content
    sys_sep: str = ""        # last_user: text between the system prompt and the last user content


def _infer(render) -> _Shape:
    """Read the shape of a template off probe renderings; raises ModelError if it is not turn-based."""
    plain = _split(render(_conv(U1, A1, U2), True), [U1, A1, U2])
    if plain is None:
        raise ModelError("the chat template does not render user/assistant messages verbatim and in order; "
                         "it cannot be translated to an Ollama template (write TEMPLATE by hand)")
    header, u2a, a2u, tail = plain
    try:
        with_sys = render(_conv(S, U1, A1, U2), True)
    except Exception:  # templates that reject system messages (Gemma-1/2) raise here
        return _Shape(header, u2a, a2u, tail, "unsupported")
    first = _split(with_sys, [S, U1, A1, U2])
    if first is not None and first[2:] == [u2a, a2u, tail]:
        return _Shape(header, u2a, a2u, tail, "first", sys_header=first[0], sys_to_user=first[1])
    last = _split(with_sys, [U1, A1, S, U2])
    if last is not None and last[0] == header and last[1] == u2a and last[2] == a2u and last[4] == tail:
        return _Shape(header, u2a, a2u, tail, "last_user", sys_sep=last[3])
    raise ModelError("the chat template places the system prompt in a way tunelab cannot translate "
                     "(neither before the first user turn nor inside the last one); write TEMPLATE by hand")


def _model_render(shape: _Shape, messages: list) -> str:
    """What the Go template built from `shape` renders (Ollama semantics), to check it against Jinja.

    This models the shape, not Go: tests render the emitted template with real Go text/template."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    msgs = [m for m in messages if m["role"] != "system"]
    last_user = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=-1)
    out = []
    for i, m in enumerate(msgs):
        if m["role"] == "user":
            if i == 0:
                if system and shape.system == "first":
                    out.append(shape.sys_header + system + shape.sys_to_user)
                else:
                    out.append(shape.header)
            else:
                out.append(shape.assistant_to_user)
            if system and (shape.system == "unsupported" and i == 0):
                out.append(system + "\n\n")
            if system and shape.system == "last_user" and i == last_user:
                out.append(system + shape.sys_sep)
            out.append(m["content"])
            if i == len(msgs) - 1:
                out.append(shape.tail)
        else:
            out.append(shape.user_to_assistant + m["content"])
    return "".join(out)


def _lit(text: str) -> str:
    """A Go string literal action; all output whitespace comes from these, so layout can be trimmed."""
    return "{{- " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def _go_template(shape: _Shape) -> str:
    if shape.system == "first":
        first = ("{{- if $.System }}" + _lit(shape.sys_header) + "{{- $.System }}" + _lit(shape.sys_to_user)
                 + "{{- else }}" + _lit(shape.header) + "{{- end }}")
    else:
        first = _lit(shape.header)
    lines = ["{{- /* tunelab: translated from the Hugging Face chat template; system: " + shape.system + " */ -}}"]
    if shape.system == "last_user":
        lines += ["{{- $lastUser := -1 }}",
                  '{{- range $i, $m := .Messages }}{{ if eq $m.Role "user" }}{{ $lastUser = $i }}{{ end }}{{ end }}']
    lines += [
        "{{- $started := false }}",
        "{{- range $i, $m := .Messages }}",
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}",
        '{{- if eq $m.Role "user" }}',
        "{{- if not $started }}" + first + "{{- else }}" + _lit(shape.assistant_to_user) + "{{- end }}",
    ]
    if shape.system == "unsupported":  # merged into the first user turn, as Ollama's own Gemma template does
        lines.append("{{- if and $.System (not $started) }}{{- $.System }}" + _lit("\n\n") + "{{- end }}")
    if shape.system == "last_user":
        lines.append("{{- if and $.System (eq $i $lastUser) }}{{- $.System }}" + _lit(shape.sys_sep) + "{{- end }}")
    lines += [
        "{{- $m.Content }}",
        "{{- if $last }}" + _lit(shape.tail) + "{{- end }}",
        "{{- $started = true }}",
        '{{- else if eq $m.Role "assistant" }}',
        "{{- if not $started }}" + _lit(shape.header) + "{{- end }}",
        _lit(shape.user_to_assistant) + "{{- $m.Content }}",
        "{{- $started = true }}",
        "{{- end }}",
        "{{- end }}",
    ]
    return "\n".join(lines)


def _family(shape: _Shape) -> str:
    marks = shape.user_to_assistant + shape.assistant_to_user
    for name, token in (("chatml", "<|im_start|>"), ("llama3", "<|start_header_id|>"), ("gemma", "<start_of_turn>"),
                        ("phi3", "<|end|>"), ("zephyr", "<|assistant|>"), ("llama2", "<<SYS>>"),
                        ("mistral", "[/INST]")):
        if token in marks or token in shape.sys_header:
            return "llama2" if name == "mistral" and "<<SYS>>" in shape.sys_header else name
    return "turns"


def _stops(shape: _Shape, bos_token: str, eos_token: str, special_tokens) -> list:
    """End-of-turn marker, the next turn's opening marker (both read between an assistant message and
    the next user message) and EOS: a model that skips its end-of-turn token still stops before
    writing the user's next turn."""
    specials = sorted(set(special_tokens or ()), key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(t) for t in specials)) if specials else _SPECIAL
    matches = list(pattern.finditer(shape.assistant_to_user))
    found = []
    for m, nxt in zip(matches, matches[1:] + [None]):
        # BOS repeated before a turn opener (Llama-2's "</s><s>[INST]") is no stop; a BOS that opens the
        # turn itself (SmolLM2's bos is "<|im_start|>") is
        if m.group(0) == bos_token and nxt is not None and nxt.start() == m.end():
            continue
        if m.group(0) != eos_token:
            found.append(m.group(0))
    found = found[:2]
    stops = found + ([eos_token] if eos_token else [])
    return [t for i, t in enumerate(stops) if t not in stops[:i]]


def translate(chat_template: str, bos_token: str = "", eos_token: str = "", special_tokens=()) -> OllamaTemplate:
    """Translate a Jinja chat template into an Ollama Go template, checked on sample conversations.

    Args:
        chat_template: the Jinja source (tokenizer.chat_template).
        bos_token, eos_token: the tokenizer's strings, as the template sees them.
        special_tokens: the tokenizer's special tokens (stop strings are picked among them).

    Raises:
        ModelError: the template is not a turn-based chat template tunelab can translate.
    """
    if not chat_template:
        raise ModelError("the model has no chat template, so there is nothing to translate for Ollama; "
                         "set tokenizer.chat_template (or export with --format gguf and write TEMPLATE by hand)")

    def render(messages, gen):
        return render_jinja(chat_template, messages, gen, bos_token, eos_token)

    try:
        shape = _infer(render)
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(f"the chat template fails on a plain user/assistant conversation ({e}); "
                         "it cannot be translated to an Ollama template") from e
    checks = [_conv(U1), _conv(U1, A1, U2, A2, U3)]
    if shape.system != "unsupported":
        checks += [_conv(S, U1), _conv(S, U1, A1, U2, A2, U3)]
    for conv in checks:
        want, got = render(conv, True), _model_render(shape, conv)
        if want != got:
            raise ModelError("the chat template is not turn-based (it renders differently in later turns); "
                             f"tunelab cannot translate it to an Ollama template.\n  jinja: {want!r}\n  "
                             f"model: {got!r}\nWrite TEMPLATE by hand in the Modelfile")
    notes = []
    if shape.system == "unsupported":
        notes.append("the Jinja template rejects system messages; the Ollama template puts a system prompt "
                     "at the start of the first user turn")
    today = time.strftime("%d %b %Y")
    if today in shape.header + shape.sys_header:  # Llama-3.1's "Today Date: ..." from strftime_now
        notes.append(f"the Jinja template writes today's date into the prompt; the Ollama template keeps the "
                     f"export date ({today})")
    try:
        padded = [{"role": "user", "content": " " + U1 + " "}]
        if render(padded, True) != render(_conv(U1), True).replace(U1, " " + U1 + " "):
            notes.append("the Jinja template trims message contents; the Ollama template does not")
    except Exception:
        pass
    return OllamaTemplate(family=_family(shape), template=_go_template(shape),
                          stop=_stops(shape, bos_token, eos_token, special_tokens), system=shape.system, notes=notes)


def translate_tokenizer(tok) -> OllamaTemplate:
    """translate() with a Hugging Face tokenizer's template and tokens."""
    template = getattr(tok, "chat_template", None) or ""
    if isinstance(template, dict):  # several named templates: the chat one is "default"
        template = template.get("default", "")
    return translate(template, bos_token=tok.bos_token or "",
                     eos_token=tok.eos_token or "", special_tokens=list(getattr(tok, "all_special_tokens", []))
                     + [t.content for t in getattr(tok, "added_tokens_decoder", {}).values() if t.special])
