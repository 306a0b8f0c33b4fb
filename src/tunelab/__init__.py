"""tunelab: adapt an open LLM to your own task on your own machine.

The public API; the `tunelab` command calls exactly these functions.

    import tunelab
    result = tunelab.train("examples/lora.yaml", ["train.max_steps=50"])
    model, tokenizer = tunelab.load_model(result.run_dir)
    tunelab.generate(model, tokenizer, ["Is this review positive? 'Great food!'"])
    tunelab.export(result.run_dir, format="merged", out="merged/")

Names load on first use, so `import tunelab` (and `tunelab --help`) stays fast.
"""

import importlib
import logging
import os

# oneDNN (PyTorch's CPU matmuls) caches a compiled kernel per matmul shape, 1024 of them by default
# in each of two caches. Packed training rows change length every step, so every step adds ~60 new
# shapes and a long run's memory grows by ~1 GB before the caches fill. 256 holds a step's shapes
# at no measured speed cost (bench/RESULTS.md). Read when the first matmul runs; a user's own
# setting wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "256")
os.environ.setdefault("LRU_CACHE_CAPACITY", "256")

# peft imports bitsandbytes whenever it is installed, and bitsandbytes then warns on every CPU run
# that an optional kernel package is missing (its plain CPU kernels work); users need not see that
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.1.0"

_API = {
    "train": "tunelab.training", "TrainResult": "tunelab.training",
    "load_config": "tunelab.config", "RunConfig": "tunelab.config",
    "load_model": "tunelab.models", "resolve_model": "tunelab.models",
    "generate": "tunelab.generation", "generate_file": "tunelab.generation", "stream_chat": "tunelab.generation",
    "SamplingConfig": "tunelab.generation",
    "chat_loop": "tunelab.chat",
    "export": "tunelab.exporters",
    "quantize": "tunelab.quantization", "quantize_report": "tunelab.quantization",
    "inspect_data": "tunelab.data.inspect",
    "quickstart": "tunelab.recipes.quickstart",
    "evaluate": "tunelab.evaluation", "compare": "tunelab.evaluation", "judge": "tunelab.evaluation",
    "learning_curve": "tunelab.evaluation", "EvalResult": "tunelab.evaluation",
    "CompareResult": "tunelab.evaluation", "JudgeResult": "tunelab.evaluation", "CurveResult": "tunelab.evaluation",
    "serve": "tunelab.serving",
    "plan": "tunelab.planning", "PlanResult": "tunelab.planning",
    "TunelabError": "tunelab.errors", "ConfigError": "tunelab.errors", "DataError": "tunelab.errors",
    "ModelError": "tunelab.errors", "RunError": "tunelab.errors",
}
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tunelab' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
