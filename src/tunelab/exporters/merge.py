"""Merged export: base + LoRA adapter folded into one plain Hugging Face folder (safetensors)."""

import shutil
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.runs import atomic_dir

FORMATS = ("merged", "ollama")
PLANNED = {"gguf": "GGUF for llama.cpp", "gguf-adapter": "a LoRA adapter GGUF for llama.cpp --lora"}


def export(model_ref: str, format: str = "merged", out: "str | Path | None" = None, dtype: str = "fp32",
           quant: str = "q4_k_m") -> Path:
    """Export a run (or any model reference) to `out`.

    Args:
        model_ref: run directory, its final/ or a checkpoint, or any model reference.
        format: "merged" (plain Hugging Face folder that transformers loads without peft) or "ollama"
            (a folder with the GGUF and a Modelfile, see exporters/ollama.py).
        out: destination folder (default: <run>/export/merged).
        dtype: fp32 | bf16 | fp16 for the saved weights (merged).
        quant: GGUF type for ollama (q4_k_m, q8_0, f16, ...).

    Returns:
        The folder written. It appears only when complete (written under a temporary name).
    """
    if format in PLANNED:
        raise TunelabError(f"export format {format!r} ({PLANNED[format]}) is not available in this version of "
                           "tunelab yet; export --format merged and convert that folder with llama.cpp's "
                           "convert_hf_to_gguf.py")
    if format not in FORMATS:
        raise TunelabError(f"export format {format!r} is unknown; use one of: {', '.join(FORMATS)}")
    if format == "ollama":
        from tunelab.exporters.ollama import export_ollama

        return export_ollama(model_ref, Path(out) if out else Path(model_ref) / "export" / "ollama", quant=quant)
    from tunelab.models import load_model

    out = Path(out) if out else Path(model_ref) / "export" / "merged"
    model, tok = load_model(model_ref, dtype=dtype, device="cpu")
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        _copy_provenance(model_ref, tmp)
    return out


def _copy_provenance(model_ref, folder: Path) -> None:
    """Keep the run's provenance next to the weights: its config and manifest."""
    run = Path(model_ref)
    for name in ("config.yaml", "manifest.json"):
        if (run / name).is_file():
            shutil.copy(run / name, folder / f"tunelab_{name}")
