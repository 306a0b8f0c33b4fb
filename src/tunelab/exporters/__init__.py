"""Export: merged Hugging Face folders, GGUF files, LoRA adapter GGUFs for llama.cpp and Ollama folders
(merge.export dispatches)."""

from tunelab.exporters.merge import export

__all__ = ["export"]
