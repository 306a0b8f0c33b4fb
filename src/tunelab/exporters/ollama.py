"""Ollama export: a folder with the checked GGUF and a Modelfile that keeps the chat format.

Exports that "talk gibberish or never stop" in Ollama lost their chat template or stop tokens; so
the Modelfile carries the model's own chat template translated to Go (go_template.py, checked on
sample conversations before anything is written), a PARAMETER stop for each end-of-turn/EOS token,
the run's system prompt and the license we know of.
"""

import json
import re
from pathlib import Path

from tunelab.errors import ModelError, TunelabError
from tunelab.exporters.go_template import OllamaTemplate, translate_tokenizer
from tunelab.runs import atomic_dir, atomic_write_json, atomic_write_text

GGUF_NAME = "model.gguf"
LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md")


def export_ollama(model_ref: str, out_dir: "str | Path", quant: str = "q4_k_m", name: str | None = None,
                  check: bool = True) -> Path:
    """Export a run or model to an Ollama folder: model.gguf + Modelfile (+ tunelab_ollama.json).

    Args:
        model_ref: run directory (adapters are merged), Hugging Face folder, alias, .gguf or hub id.
        out_dir: the folder to write; it appears only when complete.
        quant: GGUF type (q4_k_m, q8_0, f16, ...), see tunelab.exporters.gguf.
        name: the Ollama model name for the `ollama create` command (default: the run's name, else
            from model_ref).
        check: run the GGUF parity check (recommended).

    Returns:
        out_dir. `ollama_command(out_dir)` gives the `ollama create` line (also in tunelab_ollama.json).
    """
    out_dir = Path(out_dir)
    tok, system_prompt, license_text, run_name = _model_info(model_ref)
    # translate (and check) the template before the slow GGUF export: a template we cannot carry
    # fails the export up front instead of producing a model that never stops
    tpl = translate_tokenizer(tok)
    name = model_name(name or run_name or model_ref)
    modelfile = render_modelfile(tpl, system_prompt=system_prompt, license_text=license_text,
                                 header=f"tunelab export of {model_ref} ({tpl.family} chat template, GGUF {quant})")
    from tunelab.exporters.gguf import export_gguf  # llama.cpp is an optional dependency

    with atomic_dir(out_dir) as tmp:
        export_gguf(model_ref, tmp / GGUF_NAME, quant=quant, check=check)
        atomic_write_text(tmp / "Modelfile", modelfile)
        atomic_write_json(tmp / "tunelab_ollama.json", {
            "model_ref": str(model_ref), "quant": quant, "name": name, "family": tpl.family,
            "system_placement": tpl.system, "stop": tpl.stop, "notes": tpl.notes,
            "command": f"ollama create {name} -f Modelfile"})
    return out_dir


def ollama_command(out_dir: "str | Path") -> str:
    """The command that registers an exported folder with Ollama, runnable from anywhere."""
    out_dir = Path(out_dir)
    info = json.loads((out_dir / "tunelab_ollama.json").read_text())
    return f"ollama create {info['name']} -f {out_dir / 'Modelfile'}"


def model_name(ref: str) -> str:
    """An Ollama-friendly name from a model reference (lowercase letters, digits, . _ -)."""
    path = Path(str(ref).rstrip("/"))
    stem = path.parent.name if path.name in ("final", "") else path.name
    if path.name.startswith("checkpoint") and path.parent.name:
        stem = f"{path.parent.name}-{path.name}"
    name = re.sub(r"[^a-z0-9._-]+", "-", stem.removesuffix(".gguf").lower()).strip("-._")
    return name or "tunelab-model"


def _quote(keyword: str, text: str) -> str:
    if '"""' in text:
        raise TunelabError(f'the Modelfile {keyword} cannot hold text containing """; remove it from the '
                           f"{keyword.lower()} text")
    return f'{keyword} """{text}"""'


def render_modelfile(tpl: OllamaTemplate, system_prompt: str | None = None, license_text: str | None = None,
                     header: str = "", gguf: str = GGUF_NAME) -> str:
    """The Modelfile text: FROM, TEMPLATE, PARAMETER stop per token, SYSTEM, LICENSE."""
    lines = [f"# {header}" if header else "# tunelab export"]
    lines += [f"# note: {n}" for n in tpl.notes]
    lines += ["# register it:  ollama create <name> -f Modelfile", "", f"FROM ./{gguf}", "",
              _quote("TEMPLATE", tpl.template), ""]
    for stop in tpl.stop:
        if '"' in stop or "\n" in stop:
            raise TunelabError(f"stop token {stop!r} cannot be written as a Modelfile PARAMETER")
        lines.append(f'PARAMETER stop "{stop}"')
    if system_prompt:
        lines += ["", _quote("SYSTEM", system_prompt)]
    if license_text:
        lines += ["", _quote("LICENSE", license_text.strip())]
    else:
        lines += ["", "# LICENSE: unknown to tunelab; the base model's license applies, check it before sharing"]
    return "\n".join(lines) + "\n"


def _model_info(model_ref: str):
    """(tokenizer, the run's system prompt, the license we can find, the run's name), no weights loaded."""
    from tunelab.models.load import load_tokenizer, local_folder, run_model_dir, run_root
    from tunelab.models.resolve import resolve_model

    source = resolve_model(model_ref)
    system_prompt, chat_template, base_ref, run_name = None, None, str(model_ref), None
    if source.kind == "run":
        from tunelab.config import load_config

        weights, root = run_model_dir(source.path), run_root(source.path)
        cfg = load_config(root / "config.yaml") if root else None
        if cfg is not None:
            system_prompt, chat_template, base_ref = cfg.data.system_prompt, cfg.model.chat_template, cfg.model.ref
            run_name = cfg.name
        if (weights / "tokenizer_config.json").is_file():
            folder = weights
        elif cfg is not None:
            folder = local_folder(resolve_model(cfg.model.ref), cfg.model.revision)
        else:
            raise ModelError(f"model {model_ref}: no tokenizer beside the weights and no config.yaml to find the base")
        base_folder = folder if cfg is None else local_folder(resolve_model(cfg.model.ref), cfg.model.revision)
    else:
        folder = base_folder = local_folder(source)
    tok = load_tokenizer(folder, chat_template)
    return tok, system_prompt, _license(base_folder, base_ref), run_name


def _license(folder: Path, base_ref: str) -> str | None:
    for name in LICENSE_FILES:
        if (folder / name).is_file():
            return (folder / name).read_text(errors="replace")
    readme = folder / "README.md"
    if readme.is_file():  # Hugging Face model cards name the license in their front matter
        m = re.search(r"^license:\s*(\S+)", readme.read_text(errors="replace")[:4000], re.M)
        if m:
            return f"License: {m.group(1)} (from the model card of the base model)"
    from tunelab.models.resolve import ALIASES

    alias = ALIASES.get(base_ref)
    if alias and "Apache-2.0" in alias.note:
        return f"License: Apache-2.0 ({alias.hub_id})"
    return None
