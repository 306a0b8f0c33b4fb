"""Merged export: base + LoRA adapter folded into one plain Hugging Face folder (safetensors)."""

import shutil
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.runs import atomic_dir

FORMATS = ("merged", "gguf", "gguf-adapter", "ollama")


def export(model_ref: str, format: str = "merged", out: "str | Path | None" = None, dtype: str = "fp32",
           quant: str = "q4_k_m", check: bool = True) -> Path:
    """Export a run (or any model reference) to `out`.

    Args:
        model_ref: run directory, its final/ or a checkpoint, or any model reference.
        format: "merged" (plain Hugging Face folder that transformers loads without peft),
            "gguf" (one llama.cpp file, adapter merged), "gguf-adapter" (llama.cpp --lora file) or
            "ollama" (a folder with the GGUF and a Modelfile, see exporters/ollama.py).
        out: destination (default: <run>/export/merged, <run>/export/model-<quant>.gguf,
            <run>/export/adapter.gguf, <run>/export/ollama).
        dtype: fp32 | bf16 | fp16 for the saved weights (merged).
        quant: llama.cpp type for gguf and ollama: f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0, ... (exporters.gguf).
        check: for gguf formats, compare the file with the source in llama.cpp and keep it only if it matches.

    Returns:
        The folder written. It appears only when complete (written under a temporary name).
    """
    if format not in FORMATS:
        raise TunelabError(f"export format {format!r} is unknown; use one of: {', '.join(FORMATS)}")
    if format == "gguf":
        from tunelab.exporters.gguf import export_gguf

        return export_gguf(model_ref, out or Path(model_ref) / "export" / f"model-{quant}.gguf", quant, check)
    if format == "gguf-adapter":
        from tunelab.exporters.gguf_adapter import export_gguf_adapter

        return export_gguf_adapter(model_ref, out or Path(model_ref) / "export" / "adapter.gguf", check)
    if format == "ollama":
        from tunelab.exporters.ollama import export_ollama

        return export_ollama(model_ref, Path(out) if out else Path(model_ref) / "export" / "ollama", quant=quant,
                             check=check)
    from tunelab.models import load_model

    out = Path(out) if out else Path(model_ref) / "export" / "merged"
    # a qlora adapter merges into the full-precision base (as the QLoRA paper does), never a 4-bit one
    model, tok = load_model(model_ref, dtype=dtype, device="cpu", quantization="none")
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
