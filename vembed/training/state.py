"""What a run has done so far: one :class:`TrainState`, saved in each checkpoint's ``state.json``.

``to_dict`` writes it and ``from_dict`` reads it back, so checkpoint and resume cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


class LossWindow:
    """Running loss and throughput since the last metrics row."""

    def __init__(self):
        self.reset()
        self.last_loss = float("nan")

    def reset(self) -> None:
        self.loss_sum, self.steps, self.images, self.seconds = 0.0, 0, 0, 0.0

    def add(self, loss, images: int, seconds: float) -> None:
        # the loss stays a tensor: reading it would wait for the GPU
        self.loss_sum = self.loss_sum + (loss.detach() if isinstance(loss, torch.Tensor) else loss)
        self.steps += 1
        self.images += images
        self.seconds += seconds
        self.last_loss = loss

    @property
    def loss(self) -> float:
        return float(self.loss_sum / self.steps) if self.steps else float(self.last_loss)

    @property
    def rate(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return {
            "loss_sum": float(self.loss_sum),
            "steps": self.steps,
            "images": self.images,
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, data: dict) -> LossWindow:
        window = cls()
        window.loss_sum, window.steps = data["loss_sum"], data["steps"]
        window.images, window.seconds = data["images"], data["seconds"]
        return window


@dataclass
class TrainState:
    """Counters, validation history and the selected validation row of a run.

    ``scheduler``/``scaler`` hold the state dicts of the lr schedule and the fp16 grad scaler as they were
    when the state was saved; ``settings`` the run's settings (a resume checks them).
    """

    step: int = 0
    total_steps: int = 0
    steps_per_epoch: int = 1
    images: int = 0  # images trained on, all processes
    train_seconds: float = 0.0  # training time (validation, checkpoints and callbacks excluded)
    last_validated: int = -1
    history: list[dict] = field(default_factory=list)  # one row per validation
    best: dict | None = None  # the validation row train.select chose so far
    window: LossWindow = field(default_factory=LossWindow)
    scheduler: dict | None = None
    scaler: dict | None = None
    sampler: dict | None = None  # the batch sampler's state_dict, when it has one (re-mined negatives)
    settings: dict = field(default_factory=dict)

    @property
    def epoch(self) -> float:
        return round(self.step / self.steps_per_epoch, 4)

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["window"] = self.window.to_dict()
        out["epoch"] = self.epoch  # for readers of state.json; derived, not read back
        return out

    @classmethod
    def from_dict(cls, data: dict) -> TrainState:
        known = {f.name for f in fields(cls)}
        state = cls(**{k: v for k, v in data.items() if k in known and k != "window"})
        state.window = LossWindow.from_dict(data["window"])
        return state


def plan(train, state: TrainState, processes: int, images: int) -> str:
    """What ``train.epochs`` / ``train.max_steps`` mean for this data, said once at the start."""
    batch = train.batch_size * train.grad_accum * processes
    per_epoch = state.steps_per_epoch * batch
    source = f"train.max_steps={train.max_steps}" if train.max_steps else f"train.epochs={train.epochs}"
    epochs = state.total_steps / state.steps_per_epoch
    text = (
        f"{source}: {_count(state.total_steps, 'step')} of {batch} images = {state.total_steps * batch:,} images "
        f"({epochs:.3g} epoch{'' if epochs == 1 else 's'}; an epoch is {_count(state.steps_per_epoch, 'step')}, "
        f"{per_epoch:,} of the {images:,} training images)"
    )
    if batch > images:
        text += (
            f"\nnote: a batch of {batch} images is more than the whole training set ({images:,} images), so "
            f"every batch repeats images; a train.batch_size of at most {images // (train.grad_accum * processes) or 1} "
            "draws each image once per step"
        )
    return text


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"
