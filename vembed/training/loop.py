"""The training loop: one accelerate-backed loop for every method and loss.

``train(settings)`` checks the settings (before any data is read), builds the model, the data and the
optimiser, resumes from the last checkpoint when asked, trains with validation and checkpoints, and
writes ``final/``: a merged model folder that every ``--model`` option accepts.

The parts: :mod:`~vembed.training.state` (what a checkpoint holds), :mod:`~vembed.training.steps` (one
step runner per strategy), :mod:`~vembed.training.selection` (which validated model is kept),
:mod:`~vembed.training.callbacks` (progress, metrics rows, trackers, stop signals),
:mod:`~vembed.training.saving` (``best/`` and ``final/``).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from accelerate.utils import set_seed

from vembed.console import log
from vembed.errors import VembedError
from vembed.io import write_text
from vembed.settings import Settings, settings_to_yaml
from vembed.tasks import get_task
from vembed.training import checkpoint as ckpt
from vembed.training.callbacks import ProgressBar, StopSignal, Trackers, TrainRows
from vembed.training.data import epoch_batches
from vembed.training.metrics import MetricsLog
from vembed.training.model import load_trainable_state, set_train_mode, trainable_state
from vembed.training.optim import build_optimizer, build_scheduler, param_groups
from vembed.training.plot import PLOT_FILE, plot_metrics
from vembed.training.preflight import FINAL_DIR, check_processes, check_resumable, check_settings
from vembed.training.result import StepInfo, TrainingInterrupted, TrainResult
from vembed.training.runtime import deterministic, make_accelerator, release_accelerator
from vembed.training.saving import BestStore, checkpoint_selections, saved_training
from vembed.training.selection import Selection, resolution_warning
from vembed.training.state import TrainState, plan

SETTINGS_FILE = "settings.yaml"


def train(
    settings: Settings, *, show_progress: bool = True, on_step: Callable[[StepInfo], None] | None = None
) -> TrainResult:
    """Fine-tune ``settings.model.name`` on ``settings.data.train``; see ``docs/training.md``.

    ``on_step`` is called after every optimiser step (checkpoint already written when one was due);
    an exception it raises ends the run like a crash, which ``train.resume=true`` recovers from.
    A new run that fails before its first checkpoint (a bad image, a wrong setting) removes its run
    directory again, so that the same command can simply be rerun.
    """
    run_dir = Path(settings.train.output_dir)
    fresh = not run_dir.exists()
    try:
        return _Trainer(settings, show_progress=show_progress, on_step=on_step).run()
    except BaseException:
        nothing_kept = run_dir.is_dir() and not ckpt.list_checkpoints(run_dir)
        if (
            fresh
            and nothing_kept
            and not (run_dir / FINAL_DIR).exists()
            and os.environ.get("RANK", "0") == "0"
        ):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


class _Trainer:
    def __init__(self, settings: Settings, *, show_progress: bool, on_step):
        self.settings = settings
        self.s = settings.train
        self.show_progress = show_progress
        self.on_step = on_step
        self.run_dir = Path(self.s.output_dir)
        self.state = TrainState()
        self.task = get_task(self.s.task)
        self.selection = Selection(self.task.select_metric(settings), self.s.select, self.s.select_smoothing)
        self.resumed_from: Path | None = None
        self.last_saved = -1
        self.paused = 0.0  # seconds of validation / checkpoints / on_step inside the training loop

    # -- the run ----------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        start = time.perf_counter()
        check_settings(self.settings)
        self.accelerator = make_accelerator(self.settings)
        check_processes(self.settings, self.accelerator.num_processes)
        main_process = self.accelerator.is_main_process
        try:
            with deterministic(self.s.deterministic):
                self._setup()
                with StopSignal() as stop:
                    self._fit(stop)
                final_dir, selected = self._finish()
        finally:
            if hasattr(self, "runner"):
                self.runner.close()  # the DataLoader workers kept between epochs
            self.accelerator.end_training()
            release_accelerator()
        state = self.state
        return TrainResult(
            run_dir=self.run_dir,
            final_dir=final_dir,
            history=state.history,
            best=state.best if selected == "best" else None,
            steps=state.step,
            seconds=time.perf_counter() - start,
            images_per_second=state.images / state.train_seconds if state.train_seconds else float("nan"),
            train_seconds=state.train_seconds,
            resumed_from=self.resumed_from,
            selected=selected,
            main_process=main_process,
        )

    def _setup(self) -> None:
        """The task's parts (model, records, loss, sampler, step runner, validator), then the optimiser,
        schedule, metrics, callbacks and resume: the same for every task."""
        acc, s, settings = self.accelerator, self.s, self.settings
        set_seed(s.seed)
        self.parts = parts = self.task.setup(settings, acc, show_progress=self.show_progress)
        self.embedder, self.data, self.loss = parts.model, parts.data, parts.loss
        self.sampler, self.validator, self.runner = parts.sampler, parts.evaluator, parts.runner
        steps_per_epoch = len(self.sampler) // s.grad_accum
        if steps_per_epoch < 1:
            raise VembedError(
                f"the training set gives {len(self.sampler)} batches per epoch, fewer than "
                f"train.grad_accum={s.grad_accum}"
            )
        self.state = TrainState(
            total_steps=s.max_steps or s.epochs * steps_per_epoch,
            steps_per_epoch=steps_per_epoch,
            settings=settings.model_dump(mode="json"),
        )
        head = [
            (f"embedder.{n}", p) for n, p in self.embedder.named_parameters() if not n.startswith("backbone.")
        ]
        head += [(f"loss.{n}", p) for n, p in self.loss.named_parameters()]
        groups = param_groups(self.embedder.backbone, head, s)
        self.trainable = [p for g in groups for p in g["params"]]
        optimizer = build_optimizer(groups, s)
        self.scheduler = build_scheduler(
            optimizer, s, total_steps=self.state.total_steps, steps_per_epoch=steps_per_epoch
        )
        # The loss (and, with cached features, the head) runs outside the DDP wrapper: its gradients
        # are averaged over processes by hand (see _sync_outside_grads).
        self.outside = self.runner.outside_parameters()
        self.model, self.optimizer = self.runner.prepare(optimizer)
        self.metrics = MetricsLog(self.run_dir, enabled=acc.is_main_process)
        self.best_store = BestStore(self.run_dir, enabled=acc.is_main_process)
        self.callbacks = [ProgressBar(self.show_progress and acc.is_main_process), TrainRows(), Trackers()]
        self._start_or_resume()
        set_train_mode(self.embedder, s.method)
        self.loss.train()

    def _fit(self, stop: StopSignal) -> None:
        state = self.state
        if state.finished:
            return  # resumed a finished run
        self._say(plan(self.s, state, self.accelerator.num_processes, len(self.data.records)))
        if state.step == 0 and self.s.eval_at_start:
            self._validate()
        num_epochs = math.ceil(state.total_steps / state.steps_per_epoch)
        processes = self.accelerator.num_processes
        for callback in self.callbacks:
            callback.on_start(self)
        try:
            # A step's time runs from the end of the previous one (waiting for data and logging included),
            # minus the pauses for validation, checkpoints and on_step.
            tic, paused = time.perf_counter(), self.paused
            for epoch in range(state.step // state.steps_per_epoch, num_epochs):
                for group in self._epoch_steps(epoch):
                    loss, count = self._optimizer_step(group)
                    state.step += 1
                    now = time.perf_counter()
                    elapsed = now - tic - (self.paused - paused)
                    tic, paused = now, self.paused
                    state.train_seconds += elapsed
                    state.images += count * processes
                    state.window.add(loss, count * processes, elapsed)
                    self._after_step(epoch, stop)
                    if state.finished:
                        return
        finally:
            for callback in self.callbacks:
                callback.on_end(self)

    def _after_step(self, epoch: int, stop: StopSignal) -> None:
        s, state = self.s, self.state
        step = state.step
        epoch_end = step % state.steps_per_epoch == 0
        for callback in self.callbacks:
            callback.on_step(self)
        if (s.eval_every and step % s.eval_every == 0) or epoch_end or state.finished:
            self._validate()
        stopping = stop.requested(self.accelerator)
        if (s.checkpoint_every and step % s.checkpoint_every == 0) or epoch_end or state.finished or stopping:
            self._save_checkpoint()
        if self.on_step is not None:
            with self._pause():
                loss = float(state.window.last_loss)
                self.on_step(StepInfo(step, state.total_steps, epoch, loss, self.lr(), self.run_dir))
        if stopping:
            path = ckpt.checkpoint_dir(self.run_dir, step)
            raise TrainingInterrupted(
                f"stopped by {stop.signal} at step {step}/{state.total_steps}; checkpoint {path}; "
                "continue with `vembed train ... --resume`",
                path,
            )

    # -- one optimiser step -----------------------------------------------------------------------

    def _epoch_steps(self, epoch: int) -> Iterator[list]:
        """The micro-batch groups (``grad_accum`` each) of the optimiser steps left in ``epoch``."""
        accum, per_epoch = self.s.grad_accum, self.state.steps_per_epoch
        batches = epoch_batches(self.sampler, epoch)[: per_epoch * accum]
        first = (self.state.step - epoch * per_epoch) * accum
        group = []
        for micro in self.runner.micro_batches(epoch, batches, first):
            group.append(micro)
            if len(group) == accum:
                yield group
                group = []

    def _optimizer_step(self, group: list) -> tuple[torch.Tensor, int]:
        acc = self.accelerator
        total, count = 0.0, 0
        for inputs, labels in group:
            with acc.accumulate(self.model):
                loss = self.runner.forward_backward(inputs, labels)
                if acc.sync_gradients:
                    self._sync_outside_grads()
                    if self.s.grad_clip is not None:
                        acc.clip_grad_norm_(self.trainable, self.s.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            total = total + loss * len(labels)
            count += len(labels)
        if not self.optimizer.step_was_skipped:
            self.scheduler.step()
        return total / max(count, 1), count  # the loss stays a tensor: no GPU sync here

    def _sync_outside_grads(self) -> None:
        if self.accelerator.num_processes == 1:
            return
        for p in self.outside:
            if p.grad is not None:
                p.grad = self.accelerator.reduce(p.grad, reduction="mean")

    # -- validation, metrics rows, checkpoints ----------------------------------------------------

    @contextlib.contextmanager
    def _pause(self):
        """Time spent here is not training time (throughput); the device finishes queued work first."""
        if self.accelerator.device.type == "cuda":
            torch.cuda.synchronize(self.accelerator.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.paused += time.perf_counter() - start

    def _validate(self) -> None:
        state = self.state
        if self.validator is None or state.last_validated == state.step:
            return
        with self._pause():
            state.last_validated = state.step
            if self.accelerator.is_main_process:
                self._run_validation()
            self.accelerator.wait_for_everyone()

    def _run_validation(self) -> None:
        state = self.state
        # validation must not move the training RNG streams (a resumed run would diverge)
        device = self.accelerator.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            metrics = self.validator(self.embedder, show_progress=self.show_progress).metrics
        set_train_mode(self.embedder, self.s.method)
        row = {"kind": "val", "step": state.step, "epoch": state.epoch, **metrics}
        if not state.history:
            warning = resolution_warning(row, self.selection.metric)
            if warning and self.selection.mode == "best":
                log(f"[yellow]warning:[/] {warning}")
        state.history.append(row)
        self.add_row(row)
        selected = self.selection.mode == "best" and self.selection.improves(state.history)
        reported = set(self.task.metrics(self.settings))
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k in reported)
        self._say(f"step {state.step}: validation {shown}" + (" [green](selected)[/]" if selected else ""))
        if selected:
            state.best = row
            keep = checkpoint_selections(self.run_dir)
            self.best_store.save(state.step, trainable_state(self.embedder, self.loss), row, keep=keep)

    def add_row(self, row: dict) -> None:
        """A metrics.jsonl row, also given to every callback's ``on_row``."""
        self.metrics.append(row)
        if self.accelerator.is_main_process:
            for callback in self.callbacks:
                callback.on_row(self, row)

    def _save_checkpoint(self) -> None:
        if self.last_saved == self.state.step:
            return
        with self._pause():
            self._write_checkpoint()

    def _write_checkpoint(self) -> None:
        acc, state = self.accelerator, self.state
        tmp = ckpt.begin(self.run_dir, state.step)
        acc.wait_for_everyone()
        if acc.is_main_process:
            state.scheduler = self.scheduler.state_dict()
            state.scaler = acc.scaler.state_dict() if acc.scaler is not None else None
            state.sampler = self.sampler.state_dict() if hasattr(self.sampler, "state_dict") else None
            ckpt.write_main(
                tmp,
                model_state=trainable_state(self.embedder, self.loss),
                optimizer=self.optimizer,
                state=state.to_dict(),
            )
        ckpt.write_rng(tmp, acc.process_index)
        acc.wait_for_everyone()
        if acc.is_main_process:
            ckpt.commit(tmp, ckpt.checkpoint_dir(self.run_dir, state.step), keep=self.s.keep_checkpoints)
            current = {state.best["step"]} if state.best else set()
            self.best_store.prune(current | checkpoint_selections(self.run_dir))
        acc.wait_for_everyone()
        self.last_saved = state.step

    def _start_or_resume(self) -> None:
        acc = self.accelerator
        path = ckpt.latest_checkpoint(self.run_dir) if self.s.resume else None
        if acc.is_main_process:
            ckpt.remove_partial(self.run_dir)
            write_text(self.run_dir / SETTINGS_FILE, settings_to_yaml(self.settings))
        if path is None:
            if self.s.resume:
                log(f"[yellow]note:[/] no checkpoint in {self.run_dir}; starting from step 0")
                self._discard_after(-1)
            acc.wait_for_everyone()
            return
        saved = TrainState.from_dict(ckpt.read_state(path))
        check_resumable(saved.settings, self.settings, path)
        if saved.steps_per_epoch != self.state.steps_per_epoch:
            raise VembedError(
                f"{path}: saved with {saved.steps_per_epoch} steps per epoch, now {self.state.steps_per_epoch} "
                "(different data or number of processes); resume with the same ones"
            )
        load_trainable_state(self.embedder, self.loss, ckpt.load_model_state(path), where=str(path))
        ckpt.load_optimizer(path, self.optimizer)
        self.scheduler.load_state_dict(saved.scheduler)
        if saved.scaler and acc.scaler is not None:
            acc.scaler.load_state_dict(saved.scaler)
        if saved.sampler and hasattr(self.sampler, "load_state_dict"):
            self.sampler.load_state_dict(saved.sampler)
        saved.total_steps = self.state.total_steps
        self.state = saved
        self.last_saved = saved.step
        self.resumed_from = path
        self._discard_after(saved.step)
        ckpt.load_rng(path, acc.process_index)
        acc.wait_for_everyone()
        self._say(f"resumed from {path} (step {saved.step}/{saved.total_steps})")

    def _discard_after(self, step: int) -> None:
        """Forget what a killed run wrote after its last checkpoint; resuming writes it again."""
        self.metrics.resume(step)
        self.best_store.discard_after(step)

    # -- the model written at the end -------------------------------------------------------------

    def _finish(self) -> tuple[Path, str]:
        acc, state = self.accelerator, self.state
        final = self.run_dir / FINAL_DIR
        done = saved_training(final)
        if done.get("finished_step") == state.step and not self.best_store.root.is_dir():
            return final, done.get("selected", "last")  # resumed a run that had already finished
        row = state.best if self.validator is not None and self.selection.mode == "best" else None
        selected = "best" if row is not None else "last"
        if acc.is_main_process:
            if row is not None and row["step"] != state.step:
                where = str(self.best_store.path(row["step"]))
                load_trainable_state(self.embedder, self.loss, self.best_store.load(row["step"]), where=where)
            training = {
                "selected": selected,
                "step": row["step"] if row is not None else state.step,
                "total_steps": state.total_steps,
                "method": self.s.method,
                "loss": self.s.loss,
                "select_metric": self.selection.metric if row is not None else None,
                "metrics": {k: v for k, v in (row or {}).items() if k != "kind"},
                "run_dir": str(self.run_dir),
                "finished_step": state.step,
            }
            self.task.save(final, self.parts, training)
            self.best_store.remove()
            which = self.selection.describe() if row is not None else "last step"
            self._say(f"final model ({which}, step {training['step']}): {final}")
            plot = plot_metrics(
                self.metrics.rows,
                self.run_dir / PLOT_FILE,
                title=str(self.run_dir),
                selected=self.selection.metric,
            )
            if plot is not None:
                self._say(f"curves: {plot}")
        acc.wait_for_everyone()
        return final, selected

    # -- small helpers ----------------------------------------------------------------------------

    def _say(self, message: str) -> None:
        if self.show_progress and self.accelerator.is_main_process:
            log(message)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"]) if hasattr(self, "optimizer") else 0.0


__all__ = ["StepInfo", "TrainResult", "TrainingInterrupted", "check_settings", "train"]
