"""Training: the loop (loop.py), LoRA (lora.py), optimizer (optim.py), checkpoints (checkpoint.py)."""

from tunelab.training.loop import TrainResult, train

__all__ = ["train", "TrainResult"]
