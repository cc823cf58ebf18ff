"""Training: ``train(settings) -> TrainResult`` (the accelerate loop), checkpoints and resume.

The loop is imported on first use (``from vembed.training import train``), so that the tasks can use
this package's pieces (data, steps, model) without importing the loop that calls them.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["StepInfo", "TrainResult", "TrainingInterrupted", "check_settings", "train"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("vembed.training.loop"), name)
    raise AttributeError(f"module 'vembed.training' has no attribute {name!r}")
