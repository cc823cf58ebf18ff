"""What ``train`` returns, what ``on_step`` receives, and the exception a stop signal ends a run with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vembed.errors import Interrupted


@dataclass
class TrainResult:
    """What a run produced; ``final_dir`` is a model folder ``create_embedder`` loads."""

    run_dir: Path
    final_dir: Path
    history: list[dict]  # one entry per validation (step 0 = before training, with eval_at_start)
    best: dict | None  # the validation entry of the model in final/ (None when final/ is the last step's)
    steps: int
    seconds: float  # wall time of the whole call
    images_per_second: float  # training throughput (all processes, validation excluded)
    train_seconds: float = 0.0
    resumed_from: Path | None = None
    selected: str = "last"  # "best": final/ is the selected validation model; "last": the last step's
    main_process: bool = True  # False on the other processes of a multi-process run (history empty)


class TrainingInterrupted(Interrupted):
    """A stop signal (SIGTERM, Ctrl-C) ended the run after saving a checkpoint."""

    def __init__(self, message: str, checkpoint: Path):
        super().__init__(message)
        self.checkpoint = checkpoint


@dataclass
class StepInfo:
    """Passed to ``on_step`` after every optimiser step."""

    step: int
    total_steps: int
    epoch: int
    loss: float
    lr: float
    run_dir: Path
