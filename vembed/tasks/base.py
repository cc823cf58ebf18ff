"""The task contract: what the training loop, preflight, export and the CLI ask of a task.

A task (retrieval, segmentation, image–text, re-ranking, ...) is a package under ``vembed/tasks/`` with
one class implementing :class:`Task`, entered by name in :data:`vembed.tasks.TASKS`. Nothing outside a
task's own package compares a task name or a head kind: the loop calls these methods, in this order::

    task.check(settings)                              # preflight: no model loaded, no data read
    parts = task.setup(settings, accelerator, ...)    # model (method applied), records, loss, sampler,
                                                      # step runner, validation evaluator
    ... the one loop: optimiser, schedule, checkpoints, resume, selection by task.select_metric ...
    task.save(out, parts, training)                   # final/: one model writer, its head saved with it

Evaluators follow :mod:`vembed.evaluation.base`: ``evaluator(model) -> EvalResult`` — the same objects
in training validation and in ``vembed eval``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch import nn

    from vembed.settings import Settings


@runtime_checkable
class StepRunner(Protocol):
    """How one micro-batch becomes gradients (see :mod:`vembed.training.steps`)."""

    def prepare(self, optimizer) -> tuple[nn.Module, Any]:
        """``(model, optimizer)`` wrapped by accelerate."""

    def outside_parameters(self) -> list:
        """Trainable parameters outside the DDP wrapper (the loss's): averaged by hand."""

    def micro_batches(self, epoch: int, batches: list[list[int]], first: int) -> Iterator[tuple]:
        """``(inputs, labels)`` on the device for ``batches[first:]`` of ``epoch``."""

    def forward_backward(self, inputs, labels) -> torch.Tensor:
        """Forward, loss, backward; the detached loss."""

    def close(self) -> None:
        """Stop the DataLoader workers kept between epochs."""


@dataclass
class TrainParts:
    """What :meth:`Task.setup` hands the loop.

    ``model`` has a ``backbone`` (its parameters get the backbone learning rate and layer decay; every
    other trainable parameter is the head's); ``data.records`` are the training records;
    ``evaluator`` validates (``None`` without ``data.val``).
    """

    model: nn.Module
    data: Any
    loss: nn.Module
    sampler: Any  # a batch sampler with set_epoch(); len() is batches per epoch
    runner: StepRunner
    evaluator: Any = None  # vembed.evaluation.base.Evaluator
    extra: dict = field(default_factory=dict)  # task-private state (e.g. cached features)


@runtime_checkable
class Task(Protocol):
    """One kind of model vembed trains and evaluates."""

    name: ClassVar[str]
    keys: ClassVar[tuple[str, ...]]  # train.* keys only this task reads: another task's run refuses them

    def check(self, settings: Settings) -> None:
        """Every settings mistake found without loading a model or reading data (one VembedError)."""

    def metrics(self, settings: Settings) -> list[str]:
        """The metrics validation reports, each of which ``train.select_metric`` may name."""

    def select_metric(self, settings: Settings) -> str:
        """The metric that ranks validations: ``train.select_metric`` when given, else the task's own."""

    def describe(self, settings: Settings) -> str:
        """The settings that decide :meth:`metrics` (``train.loss=ce, eval.k=1,10``), for messages."""

    def setup(self, settings: Settings, accelerator, *, show_progress: bool = True) -> TrainParts:
        """Build the model from ``settings.model`` with ``train.method`` applied, read the records, make
        the loss, the batch sampler, the step runner and the validation evaluator."""

    def save(self, out: Path, parts: TrainParts, training: dict) -> None:
        """Write ``final/`` (LoRA merged): the model, its head and ``vembed.json`` (``training`` kept)."""
