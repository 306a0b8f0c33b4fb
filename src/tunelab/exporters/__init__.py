"""Export: merged Hugging Face folders (GGUF and Ollama are planned, see merge.PLANNED)."""

from tunelab.exporters.merge import export

__all__ = ["export"]
