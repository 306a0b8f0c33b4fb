"""How weights load: tokenizer and model from any reference, with dtype, device and chat template.

A .gguf model is dequantized once by transformers and cached as a plain safetensors folder
(FACTS.md: a GGUF-loaded model refuses to train or save; the plain copy does both, and loads in
about a second next time instead of ~15 s).
"""

import hashlib
import os
from pathlib import Path

import torch

from tunelab.errors import ModelError
from tunelab.hardware import device as default_device
from tunelab.hardware import resolve_dtype
from tunelab.models.resolve import ModelSource, hub_snapshot, resolve_model

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "assets" / "templates"


def cache_dir() -> Path:
    return Path(os.environ.get("TUNELAB_CACHE", Path.home() / ".cache" / "tunelab"))


def named_templates() -> list[str]:
    return sorted(p.stem for p in TEMPLATES_DIR.glob("*.jinja"))


def local_folder(source: ModelSource, revision: str | None = None) -> Path:
    """A Hugging Face folder (config.json + weights + tokenizer) for a non-run source."""
    if source.kind == "hf_dir":
        return source.path
    if source.kind == "hub":
        return hub_snapshot(source.hub_id, revision)
    if source.kind == "gguf":
        return gguf_as_hf_folder(source.path / source.gguf_file)
    raise ModelError(f"model {source.ref}: a run directory has no single folder; use load_model()")


def gguf_as_hf_folder(gguf_path: Path) -> Path:
    """Dequantize a .gguf once into a cached plain Hugging Face folder; return that folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.runs import atomic_dir

    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "gguf" / f"{gguf_path.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    print(f"Converting {gguf_path.name} to a plain model folder (once; cached in {out})")
    try:
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                      dtype=torch.float32)
    except Exception as e:
        raise ModelError(f"model {gguf_path}: transformers could not read this GGUF file "
                         f"({type(e).__name__}: {str(e)[:200]}); it supports llama, mistral, qwen2, "
                         "phi3, gemma and a few other architectures") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a GGUF-loaded model refuses save_pretrained and training
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    with atomic_dir(out) as tmp:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


def load_tokenizer(folder: "str | Path", chat_template: str | None = None, trust_remote_code: bool = False):
    """Load a tokenizer and apply a chat-template override (a named template or a .jinja path)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if chat_template:
        tok.chat_template = read_chat_template(chat_template)
    if tok.pad_token is None:
        # Only used to fill batches for generation; training labels come from our own mask,
        # so a pad equal to eos never hides the eos the model must learn.
        tok.pad_token = tok.eos_token
    return tok


def read_chat_template(name_or_path: str) -> str:
    path = Path(name_or_path)
    if path.suffix == ".jinja" and path.is_file():
        return path.read_text()
    named = TEMPLATES_DIR / f"{name_or_path}.jinja"
    if named.is_file():
        # these files are indented for reading; their author's usage strips indentation and newlines
        return "".join(line.strip() for line in named.read_text().splitlines())
    raise ModelError(f"chat template {name_or_path!r}: not a .jinja file nor a named template; "
                     f"named templates: {', '.join(named_templates())}")


def load_model(ref: str, dtype: str = "auto", device: "str | torch.device | None" = None,
               chat_template: str | None = None, trust_remote_code: bool = False,
               revision: str | None = None, quantization: str | None = None, double_quant: bool = True):
    """Load a model and its tokenizer from any reference; a run directory loads base + adapter.

    Args:
        ref: alias, Hugging Face folder, .gguf file, run directory (or its final/ or a checkpoint),
            or hub id.
        dtype: auto | bf16 | fp16 | fp32 (auto: bf16 where the hardware is fast at it).
        device: where to put it (default: cuda if present, else cpu).
        chat_template: override the model's chat template (named or .jinja path).
        quantization: nf4 | fp4 | int8 to load the weights quantized with bitsandbytes (`dtype` is
            then the compute dtype); "none" forces full precision. None: full precision, except
            that a run trained with qlora loads its base as it was trained.
        double_quant: 4-bit only; also quantize the quantization constants.

    Returns:
        (model, tokenizer), the model in eval mode.
    """
    source = resolve_model(ref)
    dev = torch.device(device) if device is not None else default_device()
    torch_dtype = resolve_dtype(dtype, dev)
    quant = Quantization(quantization, double_quant, dev)
    if source.kind == "run":
        model, tok = _load_run(source.path, torch_dtype, dev, chat_template, trust_remote_code, quant)
    else:
        folder = local_folder(source, revision)
        tok = load_tokenizer(folder, chat_template, trust_remote_code)
        model = _load_weights(folder, torch_dtype, trust_remote_code, quant, dev)
    model.eval()
    return model, tok


class Quantization:
    """A bitsandbytes quantization request: kind (nf4 | fp4 | int8 | None), double quant, device."""

    KINDS = ("nf4", "fp4", "int8")

    def __init__(self, kind: str | None, double_quant: bool = True, device: "torch.device | None" = None):
        if kind is not None and kind not in (*self.KINDS, "none"):
            raise ModelError(f"quantization={kind!r}: use one of {', '.join(self.KINDS)} (or none)")
        self.kind, self.double_quant, self.device = kind, double_quant, device

    def resolved(self, trained_with: str | None) -> "Quantization":
        """None means: as the run was trained (its base quantization); "none" forces full precision."""
        return Quantization(trained_with if self.kind is None else self.kind, self.double_quant, self.device)

    @property
    def active(self) -> bool:
        return self.kind in self.KINDS

    def hf_config(self, compute_dtype: torch.dtype):
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError:
            raise ModelError(f"quantization={self.kind} needs bitsandbytes: pip install bitsandbytes") from None
        if self.kind == "int8":
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.kind,
                                  bnb_4bit_use_double_quant=self.double_quant,
                                  bnb_4bit_compute_dtype=compute_dtype)


def _load_weights(folder: Path, dtype: torch.dtype, trust_remote_code: bool,
                  quant: Quantization | None = None, device: "torch.device | None" = None):
    from transformers import AutoModelForCausalLM

    kwargs = {}
    if quant is not None and quant.active:
        # bitsandbytes places the quantized weights itself; .to() afterwards is refused. Under DeepSpeed
        # ZeRO-3 transformers refuses a device_map: DeepSpeed partitions every weight, the 4-bit ones
        # too, when accelerate hands it the model
        from transformers.integrations import is_deepspeed_zero3_enabled

        kwargs = {"quantization_config": quant.hf_config(dtype)}
        if not is_deepspeed_zero3_enabled():
            kwargs["device_map"] = str(device or "cpu")
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
        return model if kwargs or device is None else model.to(device)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ModelError(f"model {folder}: it needs its own Python code; if you trust its author set "
                             "model.trust_remote_code=true (or --trust-remote-code)") from None
        raise ModelError(f"model {folder}: could not load ({e})") from None
    except OSError as e:
        raise ModelError(f"model {folder}: could not load the weights ({str(e)[:200]})") from None


def run_root(path: Path) -> Path | None:
    """The run directory (the one holding config.yaml) at or above `path`."""
    for p in (path, *path.parents):
        if (p / "config.yaml").is_file():
            return p
    return None


def run_model_dir(path: Path) -> Path:
    """The folder with the trained weights: <run>/final, or the given final/checkpoint folder."""
    if (path / "adapter_config.json").is_file() or (path / "config.json").is_file():
        return path
    return path / "final"


def _load_run(path: Path, dtype, dev, chat_template, trust_remote_code, quant: Quantization):
    from tunelab.config import load_config

    weights = run_model_dir(path)
    root = run_root(path)
    if (weights / "config.json").is_file():  # full fine-tuning: a complete model
        tok = load_tokenizer(weights, chat_template, trust_remote_code)
        return _load_weights(weights, dtype, trust_remote_code, quant.resolved(None), dev), tok
    if root is None:
        raise ModelError(f"model {path}: an adapter without its run's config.yaml; load the base model "
                         "and the adapter with peft, or point at the run directory")
    cfg = load_config(root / "config.yaml")
    base_src = resolve_model(cfg.model.ref)
    quant = quant.resolved(cfg.base_quantization)
    base = _load_weights(local_folder(base_src, cfg.model.revision), dtype,
                         trust_remote_code or cfg.model.trust_remote_code, quant, dev)
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, weights)
    if not quant.active:
        model = model.to(dev)
    tok = load_tokenizer(weights if (weights / "tokenizer_config.json").is_file() else local_folder(base_src),
                         chat_template, trust_remote_code)
    return model, tok


def _numel(p) -> int:
    return getattr(p, "ds_numel", None) or p.numel()  # DeepSpeed ZeRO-3 leaves an empty shell, whole size in ds_numel


def count_parameters(model) -> tuple[int, int]:
    total = sum(_numel(p) for p in model.parameters())
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    return total, trainable


def describe_model(model) -> str:
    """'134.5M parameters, trainable 4.9M (3.65%), weights 538 MB' — printed when a run starts."""
    total, trainable = count_parameters(model)
    nbytes = sum(_numel(p) * p.element_size() for p in model.parameters())
    return (f"{total / 1e6:.1f}M parameters, trainable {trainable / 1e6:.2f}M "
            f"({100 * trainable / max(total, 1):.2f}%), weights {nbytes / 1e6:.0f} MB")
