"""Model references (aliases, folders, .gguf, runs, hub ids) and loading."""

from tunelab.models.load import (count_parameters, describe_model, load_model, load_tokenizer, local_folder,
                                 named_templates)
from tunelab.models.resolve import ALIASES, ModelSource, resolve_model

__all__ = ["load_model", "load_tokenizer", "local_folder", "resolve_model", "describe_model",
           "count_parameters", "named_templates", "ALIASES", "ModelSource"]
