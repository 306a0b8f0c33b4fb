"""Export: merged Hugging Face folders and Ollama folders (GGUF is planned, see merge.PLANNED)."""

from tunelab.exporters.merge import export

__all__ = ["export"]
