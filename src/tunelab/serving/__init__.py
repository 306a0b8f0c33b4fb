"""`tunelab serve`: a local OpenAI-compatible server (transformers + LoRA adapters, or llama.cpp)."""

from tunelab.serving.server import make_engine, serve

__all__ = ["serve", "make_engine"]
