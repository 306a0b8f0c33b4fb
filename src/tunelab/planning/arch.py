"""Architecture numbers of a decoder-only model, without its weights.

From a config.json (a file, or the folder that holds it), any model reference the core accepts
(alias, HF folder, .gguf, run directory, hub id found in the Hugging Face cache), or a built-in
table of known sizes (135M to 70B) that also answers for well-known hub ids offline.
"""

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

from tunelab.errors import ModelError


@dataclass(frozen=True)
class Arch:
    """What memory and time depend on. Parameter counts are derived, never typed in."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_embeddings: bool = False
    attention_bias: bool = False
    source: str = ""
    """Where the numbers came from (a path, 'built-in table: ...')."""

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder block (Llama naming)."""
        h, q, kv, i = self.hidden_size, self.q_dim, self.kv_dim, self.intermediate_size
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_params(self) -> int:
        """Parameters in the blocks' linear layers (what LoRA adapts and QLoRA quantizes)."""
        per = sum(a * b for a, b in self.linears().values())
        if self.attention_bias:
            per += self.q_dim + 2 * self.kv_dim
        return per * self.num_layers

    @property
    def embedding_params(self) -> int:
        """Input embedding plus the output head when it is not tied to it."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)

    @property
    def norm_params(self) -> int:
        return self.hidden_size * (2 * self.num_layers + 1)

    @property
    def n_params(self) -> int:
        return self.linear_params + self.embedding_params + self.norm_params

    def lora_params(self, rank: int, targets: "list[str] | str" = "all-linear") -> int:
        names = self.linears()
        if targets != "all-linear":
            wanted = [targets] if isinstance(targets, str) else list(targets)
            names = {k: v for k, v in names.items() if k in wanted}
        return rank * sum(a + b for a, b in names.values()) * self.num_layers


def _llama(name, vocab, h, i, layers, heads, kv, tie=False, head_dim=None, bias=False) -> Arch:
    return Arch(name, vocab, h, i, layers, heads, kv, head_dim or h // heads, tie, bias)


# Known sizes with their published architecture numbers (config.json of the named model).
KNOWN: dict[str, Arch] = {
    "135m": _llama("SmolLM2-135M", 49152, 576, 1536, 30, 9, 3, tie=True),
    "360m": _llama("SmolLM2-360M", 49152, 960, 2560, 32, 15, 5, tie=True),
    "0.5b": _llama("Qwen2.5-0.5B", 151936, 896, 4864, 24, 14, 2, tie=True, bias=True),
    "1b": _llama("Llama-3.2-1B", 128256, 2048, 8192, 16, 32, 8, tie=True, head_dim=64),
    "1.5b": _llama("Qwen2.5-1.5B", 151936, 1536, 8960, 28, 12, 2, tie=True, bias=True),
    "1.7b": _llama("SmolLM2-1.7B", 49152, 2048, 8192, 24, 32, 32, tie=True),
    "3b": _llama("Llama-3.2-3B", 128256, 3072, 8192, 28, 24, 8, tie=True),
    "7b": _llama("Llama-2-7B", 32000, 4096, 11008, 32, 32, 32),
    "mistral-7b": _llama("Mistral-7B-v0.3", 32768, 4096, 14336, 32, 32, 8),
    "8b": _llama("Llama-3.1-8B", 128256, 4096, 14336, 32, 32, 8),
    "13b": _llama("Llama-2-13B", 32000, 5120, 13824, 40, 40, 40),
    "14b": _llama("Qwen2.5-14B", 152064, 5120, 13824, 48, 40, 8, bias=True),
    "33b": _llama("LLaMA-33B", 32000, 6656, 17920, 60, 52, 52),
    "65b": _llama("LLaMA-65B", 32000, 8192, 22016, 80, 64, 64),
    "70b": _llama("Llama-2-70B", 32000, 8192, 28672, 80, 64, 8),
}
SIZE_ALIASES = {"30b": "33b", "0.135b": "135m", "0.36b": "360m", "500m": "0.5b"}

# Hub ids (lower case) whose numbers differ from the size row their name would pick.
HUB_IDS = {
    "huggingfacetb/smollm2-135m-instruct": "135m", "huggingfacetb/smollm2-135m": "135m",
    "huggingfacetb/smollm2-360m-instruct": "360m", "huggingfacetb/smollm2-1.7b-instruct": "1.7b",
    "mistralai/mistral-7b-instruct-v0.3": "mistral-7b", "mistralai/mistral-7b-v0.3": "mistral-7b",
    "mistralai/mistral-7b-v0.1": "mistral-7b", "mistralai/mistral-7b-instruct-v0.2": "mistral-7b",
    "meta-llama/meta-llama-3-8b": "8b", "meta-llama/meta-llama-3-8b-instruct": "8b",
    "meta-llama/llama-3.1-8b-instruct": "8b", "meta-llama/llama-3.1-70b": "70b",
}


def known_sizes() -> list[str]:
    return list(KNOWN)


def from_config_dict(conf: dict, source: str) -> Arch:
    """Arch from the fields of a transformers config.json (Llama, Mistral, Qwen2, Gemma, Phi-3 ...)."""
    conf = {**conf, **conf.get("text_config", {})}  # multimodal configs nest the language model
    try:
        h = int(conf["hidden_size"])
        heads = int(conf["num_attention_heads"])
        arch = Arch(
            name=conf.get("_name_or_path") or conf.get("model_type", "model"),
            vocab_size=int(conf["vocab_size"]), hidden_size=h,
            intermediate_size=int(conf.get("intermediate_size") or 4 * h),
            num_layers=int(conf["num_hidden_layers"]), num_heads=heads,
            num_kv_heads=int(conf.get("num_key_value_heads") or heads),
            head_dim=int(conf.get("head_dim") or h // heads),
            tie_embeddings=bool(conf.get("tie_word_embeddings", False)),
            attention_bias=bool(conf.get("attention_bias", conf.get("model_type") == "qwen2")),
            source=source)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"{source}: not a decoder config.json this planner understands (missing or bad "
                         f"{e}); it needs hidden_size, num_attention_heads, num_hidden_layers, vocab_size") from None
    return arch


def read_config_json(path: "str | Path") -> Arch:
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        conf = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: cannot read it as config.json ({e})") from None
    return from_config_dict(conf, str(path))


def from_gguf(path: Path) -> Arch:
    """Architecture from a .gguf file's metadata (no tensor is read)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def field(key, default=None):
        f = reader.fields.get(key)
        if f is None:
            return default
        value = f.parts[f.data[0]]
        return value.tobytes().decode() if value.dtype.kind == "u" and value.dtype.itemsize == 1 else value[0]

    arch = field("general.architecture")
    try:
        h = int(field(f"{arch}.embedding_length"))
        heads = int(field(f"{arch}.attention.head_count"))
        tokens = reader.fields["tokenizer.ggml.tokens"]
        names = {t.name for t in reader.tensors}
        return Arch(name=str(field("general.name", path.stem)), vocab_size=len(tokens.data), hidden_size=h,
                    intermediate_size=int(field(f"{arch}.feed_forward_length")),
                    num_layers=int(field(f"{arch}.block_count")), num_heads=heads,
                    num_kv_heads=int(field(f"{arch}.attention.head_count_kv", heads)),
                    head_dim=int(field(f"{arch}.attention.key_length", h // heads)),
                    tie_embeddings="output.weight" not in names, source=str(path))
    except (TypeError, KeyError) as e:
        raise ModelError(f"{path}: its GGUF metadata lacks {e}; pass the model's config.json instead") from None


def from_table(key: str, source: str = "") -> Arch:
    key = SIZE_ALIASES.get(key.lower(), key.lower())
    arch = KNOWN[key]
    return replace(arch, source=source or f"built-in table: {key.upper()} ({arch.name})")


def _size_in_name(name: str) -> str | None:
    """'meta-llama/Llama-2-7b-hf' -> '7b' when that size is in the table."""
    for m in re.finditer(r"(?<![\d.])(\d+(?:\.\d+)?)\s*([bm])(?![a-z])", name.lower()):
        key = SIZE_ALIASES.get(m.group(1) + m.group(2), m.group(1) + m.group(2))
        if key in KNOWN:
            return key
    return None


def resolve_arch(ref: str) -> Arch:
    """Architecture numbers for any model reference, a config.json, or a known size ("7b")."""
    arch = _resolve(str(ref))
    if arch.name in ("model", "llama", "mistral", "qwen2", "gemma", "phi3", "") or "/" in arch.name and Path(arch.name).exists():
        arch = replace(arch, name=str(ref))
    return arch


def _resolve(ref: str) -> Arch:
    from tunelab.models.resolve import ALIASES, resolve_model

    ref = str(ref)
    key = SIZE_ALIASES.get(ref.lower(), ref.lower())
    if key in KNOWN:
        return from_table(key)
    path = Path(ref).expanduser()
    if path.suffix == ".json" and path.is_file():
        return read_config_json(path)
    if ref in ALIASES and ALIASES[ref].package is None:
        ref = ALIASES[ref].hub_id  # a hub alias: look in the HF cache, then the table
    source = resolve_model(ref)
    if source.kind == "hf_dir":
        return read_config_json(source.path)
    if source.kind == "gguf":
        cached = _cached_gguf_folder(source.path / source.gguf_file)
        return read_config_json(cached) if cached else from_gguf(source.path / source.gguf_file)
    if source.kind == "run":
        from tunelab.config import load_config
        from tunelab.models.load import run_model_dir, run_root

        weights = run_model_dir(source.path)
        if (weights / "config.json").is_file():
            return read_config_json(weights)
        root = run_root(source.path)
        if root is None:
            raise ModelError(f"model {ref}: an adapter without its run's config.yaml; pass the base model")
        return _resolve(load_config(root / "config.yaml").model.ref)
    # a hub id: the Hugging Face cache (no network), then the table
    hub = source.hub_id
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(hub, "config.json")
        if isinstance(found, str):
            return read_config_json(found)
    except Exception:
        pass
    key = HUB_IDS.get(hub.lower()) or _size_in_name(hub)
    if key:
        return from_table(key, f"built-in table: {key.upper()} ({KNOWN[key].name}), matched from {hub!r}; "
                               "pass its config.json for exact numbers")
    raise ModelError(f"model {ref!r}: no config.json for it here (not in the Hugging Face cache) and no size in "
                     f"its name; pass --model path/to/config.json, or a known size: {', '.join(KNOWN)}")


def _cached_gguf_folder(gguf_path: Path) -> Path | None:
    """The plain folder tunelab made from this .gguf earlier, if any (models/load.py's cache)."""
    import hashlib

    from tunelab.models.load import cache_dir

    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "gguf" / f"{gguf_path.stem}-{key}"
    return out if (out / "config.json").is_file() else None
