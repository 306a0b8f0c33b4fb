"""Export: merged Hugging Face folders, GGUF files and LoRA adapter GGUFs for llama.cpp (merge.export dispatches)."""

from tunelab.exporters.merge import export

__all__ = ["export"]
