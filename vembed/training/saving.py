"""What a run leaves besides checkpoints: ``best/`` while it trains and the merged ``final/`` model.

``best/step-0000040/`` holds only the trainable state of a selected model (like a checkpoint's
``model.safetensors``) and its validation row. Older ones are deleted once no kept checkpoint names
them, so a resumed run finds the model its checkpoint selected. At the end the selected state is loaded
into the model once and merged (LoRA folded in) into ``final/``.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vembed.errors import VembedError
from vembed.io import atomic_dir, read_json, write_json
from vembed.models.loader import read_model_config
from vembed.training import checkpoint as ckpt

BEST_DIR = "best"
_NAME = re.compile(r"^step-(\d+)$")


class BestStore:
    """The trainable states of selected models, ``best/step-N/{model.safetensors,row.json}``."""

    def __init__(self, run_dir: Path, *, enabled: bool = True):
        self.root = Path(run_dir) / BEST_DIR
        self.enabled = enabled

    def path(self, step: int) -> Path:
        return self.root / f"step-{step:07d}"

    def steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.root.iterdir() if (m := _NAME.match(p.name)))

    def save(self, step: int, state: dict[str, torch.Tensor], row: dict, *, keep: set[int]) -> None:
        """Write ``state`` for ``step``, then delete the states not in ``keep | {step}``."""
        if not self.enabled:
            return
        with atomic_dir(self.path(step)) as tmp:
            save_file(
                {k: v.detach().cpu().contiguous().clone() for k, v in state.items()},
                str(tmp / "model.safetensors"),
            )
            write_json(tmp / "row.json", row)
        self.prune(keep | {step})

    def load(self, step: int) -> dict[str, torch.Tensor]:
        file = self.path(step) / "model.safetensors"
        if not file.is_file():
            raise VembedError(
                f"{file}: the selected model of step {step} is missing; train.select=last keeps the last step"
            )
        return load_file(str(file))

    def prune(self, keep: set[int]) -> None:
        if self.enabled:
            for step in self.steps():
                if step not in keep:
                    shutil.rmtree(self.path(step), ignore_errors=True)

    def discard_after(self, step: int) -> None:
        """Forget states a killed run saved after its last checkpoint (a resume selects again)."""
        self.prune({s for s in self.steps() if s <= step})

    def remove(self) -> None:
        if self.enabled and self.root.exists():
            shutil.rmtree(self.root)


def checkpoint_selections(run_dir: Path) -> set[int]:
    """The steps of the models selected by the run's kept checkpoints."""
    steps = set()
    for path in ckpt.list_checkpoints(run_dir):
        best = read_json(path / "state.json", missing={}).get("best")
        if best:
            steps.add(int(best["step"]))
    return steps


def saved_training(model_dir: Path) -> dict:
    """The ``training`` block of a saved model's vembed.json ({} when absent or unreadable)."""
    try:
        config = read_model_config(model_dir)
    except VembedError:
        return {}
    training = config.extra.get("training") if config is not None else None
    return training if isinstance(training, dict) else {}
