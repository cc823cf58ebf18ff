"""Small pieces the loop calls after each optimiser step: progress bar, metrics rows, trackers, stop signals.

A callback has any of ``on_start(trainer)``, ``on_step(trainer)``, ``on_row(trainer, row)`` and
``on_end(trainer)``; the trainer exposes ``state`` (:class:`~vembed.training.state.TrainState`),
``accelerator``, ``settings`` and ``lr()``.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import torch

from vembed.console import log, progress, rate_column


class Callback:
    def on_start(self, trainer) -> None:
        pass

    def on_step(self, trainer) -> None:
        pass

    def on_row(self, trainer, row: dict) -> None:
        pass

    def on_end(self, trainer) -> None:
        pass


class ProgressBar(Callback):
    """The rich progress bar: loss, lr and images/s, refreshed at most once a second."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def on_start(self, trainer) -> None:
        self.bar = progress(
            _field("loss", "{task.fields[loss]:.4f}"),
            _field("lr", "{task.fields[lr]:.2e}"),
            rate_column(),
            enabled=self.enabled,
        )
        self.bar.start()
        state = trainer.state
        self.task = self.bar.add_task(
            "training",
            total=state.total_steps,
            completed=state.step,
            loss=float("nan"),
            lr=trainer.lr(),
            rate=0.0,
        )
        self.shown = 0.0

    def on_step(self, trainer) -> None:
        state = trainer.state
        if time.perf_counter() - self.shown > 1.0 or state.finished:
            self.shown = time.perf_counter()  # reading the loss waits for the GPU: once a second
            self.bar.update(self.task, loss=state.window.loss, lr=trainer.lr(), rate=state.window.rate)
        self.bar.update(self.task, completed=state.step)

    def on_end(self, trainer) -> None:
        if hasattr(self, "bar"):
            self.bar.stop()


class TrainRows(Callback):
    """A ``kind: train`` row in metrics.jsonl every ``train.log_every`` steps and at the last step."""

    def on_step(self, trainer) -> None:
        state, acc = trainer.state, trainer.accelerator
        if state.step % trainer.settings.train.log_every and not state.finished:
            return
        window = state.window
        loss = acc.reduce(torch.tensor(window.loss, device=acc.device), "mean")  # every process joins
        trainer.add_row(
            {
                "kind": "train",
                "step": state.step,
                "epoch": state.epoch,
                "loss": float(loss),
                "lr": trainer.lr(),
                "images_per_second": window.rate,
            }
        )
        window.reset()


class Trackers(Callback):
    """Every metrics row to accelerate's trackers (tensorboard when installed)."""

    def on_row(self, trainer, row: dict) -> None:
        acc = trainer.accelerator
        if acc.trackers:
            acc.log(
                {f"{row['kind']}/{k}": v for k, v in row.items() if isinstance(v, float)}, step=row["step"]
            )


class StopSignal:
    """SIGTERM / first Ctrl-C: finish the current step, save a checkpoint, stop. Second Ctrl-C: abort.

    DataLoader workers forked while it is installed inherit the handler and get the terminal's Ctrl-C
    too: there it does nothing (the process that installed it stops the run and the workers with it),
    so the line is said once.
    """

    def __init__(self):
        self.signal: str | None = None
        self._previous: dict = {}
        self._pid = os.getpid()

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a DataLoader worker
            return
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        log(f"[yellow]{self.signal}:[/] finishing this step and saving a checkpoint (Ctrl-C again to abort)")

    def requested(self, accelerator) -> bool:
        """Whether any process got a stop signal (all processes must call this together)."""
        flag = self.signal is not None
        if accelerator.num_processes > 1:
            t = torch.tensor(float(flag), device=accelerator.device)
            flag = bool(accelerator.reduce(t, reduction="sum") > 0)
            if flag and self.signal is None:
                self.signal = "a stop signal on another process"
        return flag


def _field(name: str, fmt: str):
    from rich.progress import TextColumn

    return TextColumn(f"{name} {fmt}")
