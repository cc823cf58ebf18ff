"""The training loop: one accelerate-backed loop for every method and loss.

``train(settings)`` checks the settings (before any data is read), builds the model, the data and the
optimiser, resumes from the last checkpoint when asked, trains with validation and checkpoints, and
writes ``final/``: a merged model folder that every ``--model`` option accepts.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedType, set_seed

from vembed.console import log, progress, rate_column
from vembed.errors import VembedError
from vembed.inference import embed_records
from vembed.io import atomic_dir, write_json, write_text
from vembed.losses import LOSSES
from vembed.models.factory import VEMBED_CONFIG, resolve_device, save_embedder
from vembed.models.heads import classifier_of_loss
from vembed.models.lora import merge_lora
from vembed.settings import Settings, settings_to_yaml
from vembed.training import checkpoint as ckpt
from vembed.training.data import (
    build_batch_sampler,
    epoch_batches,
    epoch_loader,
    read_labelled,
)
from vembed.training.gradcache import grad_cache_backward
from vembed.training.metrics import METRICS_FILE, MetricsLog
from vembed.training.model import (
    build_embedder,
    check_objective,
    load_trainable_state,
    loss_kwargs,
    make_loss,
    set_train_mode,
    trainable_state,
)
from vembed.training.optim import build_optimizer, build_scheduler, param_groups
from vembed.training.plot import PLOT_FILE, plot_metrics
from vembed.training.validation import PRIMARY_METRIC, Validator

SETTINGS_FILE = "settings.yaml"
FINAL_DIR = "final"
BEST_DIR = "best"
# Settings a resumed run may change: they do not alter what is trained.
_RESUMABLE_CHANGES = {
    "train.resume",
    "train.output_dir",
    "train.keep_checkpoints",
    "train.log_every",
    "train.checkpoint_every",
    "train.eval_every",
    "train.eval_at_start",
    "data.val",
    "data.num_workers",
    "model.device",
}


@dataclass
class TrainResult:
    """What a run produced; ``final_dir`` is a model folder ``create_embedder`` loads."""

    run_dir: Path
    final_dir: Path
    history: list[dict]  # one entry per validation (step 0 = before training, with eval_at_start)
    best: dict | None  # the validation entry of the model in final/ (None without validation data)
    steps: int
    seconds: float  # wall time of the whole call
    images_per_second: float  # training throughput (all processes, validation excluded)
    train_seconds: float = 0.0
    resumed_from: Path | None = None
    selected: str = "last"  # "best": final/ is the best validation model; "last": the last step's
    main_process: bool = True  # False on the other processes of a multi-process run (history empty)


class TrainingInterrupted(Exception):
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


def check_settings(settings: Settings) -> None:
    """Every mistake that can be found without loading a model or reading data."""
    s = settings.train
    if settings.data.train is None:
        raise VembedError(
            "data.train is not set: give the training records (JSONL), e.g. data.train=train.jsonl"
        )
    for key in ("train", "val"):
        path = getattr(settings.data, key)
        if path is not None and not Path(path).is_file():
            raise VembedError(f"data.{key}: records file not found: {path}")
    if s.loss.strip().lower() not in LOSSES:
        try:
            loss_kwargs(s)
        except VembedError as exc:
            raise VembedError(f"train.loss={s.loss!r}: {exc}") from None
    loss_kwargs(s)
    run_dir = Path(s.output_dir)
    if not s.resume and any(
        (run_dir / name).exists() for name in (ckpt.CHECKPOINTS, FINAL_DIR, METRICS_FILE)
    ):
        raise VembedError(
            f"train.output_dir={run_dir} already holds a run; continue it with --resume "
            "(train.resume=true) or choose another train.output_dir"
        )


def check_processes(settings: Settings, num_processes: int) -> None:
    """Settings that only fail with several processes (DDP)."""
    if num_processes > 1 and settings.data.skip_bad:
        raise VembedError(
            "data.skip_bad=true with several processes: a batch that loses an image would give the ranks "
            "unequal batches for the cross-device loss. Drop bad images first "
            "(`vembed prepare jsonl FILE --check-images --skip-bad`), then train without data.skip_bad"
        )


class _Trainer:
    def __init__(self, settings: Settings, *, show_progress: bool, on_step):
        self.settings = settings
        self.s = settings.train
        self.show_progress = show_progress
        self.on_step = on_step
        self.run_dir = Path(self.s.output_dir)
        self.step = 0
        self.history: list[dict] = []
        self.best: dict | None = None
        self.images = 0
        self.train_seconds = 0.0
        self.resumed_from: Path | None = None
        self.last_validated = -1
        self.last_saved = -1
        self.window = _Window()  # loss and speed since the last metrics row (kept across a resume)
        self.paused = 0.0  # seconds of validation / checkpoints / on_step inside the training loop

    # -- the run ----------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        start = time.perf_counter()
        check_settings(self.settings)
        self.accelerator = _make_accelerator(self.settings)
        check_processes(self.settings, self.accelerator.num_processes)
        main_process = self.accelerator.is_main_process
        try:
            with _deterministic(self.s.deterministic):
                self._setup()
                with _StopRequest() as stop:
                    self._fit(stop)
                final_dir, selected = self._finish()
        finally:
            self.accelerator.end_training()
            _release_accelerator()
        return TrainResult(
            run_dir=self.run_dir,
            final_dir=final_dir,
            history=self.history,
            best=self.best if selected == "best" else None,
            steps=self.step,
            seconds=time.perf_counter() - start,
            images_per_second=self.images / self.train_seconds if self.train_seconds else float("nan"),
            train_seconds=self.train_seconds,
            resumed_from=self.resumed_from,
            selected=selected,
            main_process=main_process,
        )

    def _setup(self) -> None:
        acc, s = self.accelerator, self.s
        set_seed(s.seed)
        self.embedder = build_embedder(self.settings)  # LoRA target errors: before any data is read
        check_objective(s, self.embedder)
        self.data = read_labelled(self.settings.data.train, self.settings, what="training")
        self.val = (
            read_labelled(self.settings.data.val, self.settings, what="validation")
            if self.settings.data.val
            else None
        )
        self._report_problems()
        self.embedder.to(acc.device)
        self.cached = s.method == "frozen" and s.cache_features
        val_features = self._cache_features() if self.cached else None
        self.loss = make_loss(s, embed_dim=self.embedder.embed_dim, num_classes=self.data.num_classes).to(
            acc.device
        )
        self.sampler = build_batch_sampler(
            self.data, s, num_replicas=acc.num_processes, rank=acc.process_index
        )
        self.steps_per_epoch = len(self.sampler) // s.grad_accum
        if self.steps_per_epoch < 1:
            raise VembedError(
                f"the training set gives {len(self.sampler)} batches per epoch, fewer than "
                f"train.grad_accum={s.grad_accum}"
            )
        self.total_steps = s.max_steps or s.epochs * self.steps_per_epoch
        self.validator = None
        if self.val is not None:
            features, indices = val_features if val_features is not None else (None, None)
            self.validator = Validator(
                self.val,
                self.settings,
                features=features,
                feature_indices=indices,
                classifier=self._classifier if self._classifier() is not None else None,
            )
        head = [
            (f"embedder.{n}", p) for n, p in self.embedder.named_parameters() if not n.startswith("backbone.")
        ]
        head += [(f"loss.{n}", p) for n, p in self.loss.named_parameters()]
        groups = param_groups(self.embedder.backbone, head, s)
        self.trainable = [p for g in groups for p in g["params"]]
        optimizer = build_optimizer(groups, s)
        self.scheduler = build_scheduler(optimizer, self.total_steps, s.warmup_ratio)
        # The loss (and, with cached features, the head) runs outside the DDP wrapper: its gradients
        # are averaged over processes by hand (see _sync_outside_grads).
        self.outside = list(self.loss.parameters()) + (
            [p for p in self.embedder.parameters() if p.requires_grad] if self.cached else []
        )
        if self.cached:
            self.model, self.optimizer = self.embedder, acc.prepare(optimizer)
        else:
            self.model, self.optimizer = acc.prepare(self.embedder, optimizer)
        self.metrics = MetricsLog(self.run_dir, enabled=acc.is_main_process, on_row=self._track)
        self._start_or_resume()
        set_train_mode(self.embedder, s.method)
        self.loss.train()

    def _fit(self, stop: _StopRequest) -> None:
        acc, s = self.accelerator, self.s
        if self.step >= self.total_steps:
            return  # resumed a finished run
        if self.step == 0 and s.eval_at_start:
            self._validate()
        num_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        with progress(
            _field("loss", "{task.fields[loss]:.4f}"),
            _field("lr", "{task.fields[lr]:.2e}"),
            rate_column(),
            enabled=self.show_progress and acc.is_main_process,
        ) as bar:
            task = bar.add_task(
                "training",
                total=self.total_steps,
                completed=self.step,
                loss=float("nan"),
                lr=self._lr(),
                rate=0.0,
            )
            window = self.window
            shown = 0.0
            # A step's time runs from the end of the previous one (waiting for data and logging included),
            # minus the pauses for validation, checkpoints and on_step.
            tic, paused = time.perf_counter(), self.paused
            for epoch in range(self.step // self.steps_per_epoch, num_epochs):
                for group in self._epoch_steps(epoch):
                    loss, count = self._optimizer_step(group)
                    self.step += 1
                    now = time.perf_counter()
                    elapsed = now - tic - (self.paused - paused)
                    tic, paused = now, self.paused
                    self.train_seconds += elapsed
                    self.images += count * acc.num_processes
                    window.add(loss, count * acc.num_processes, elapsed)
                    if time.perf_counter() - shown > 1.0 or self.step >= self.total_steps:
                        shown = time.perf_counter()  # reading the loss waits for the GPU: once a second
                        bar.update(task, loss=window.loss, lr=self._lr(), rate=window.rate)
                    bar.update(task, completed=self.step)
                    self._after_step(epoch, window, stop)
                    if self.step >= self.total_steps:
                        return

    def _after_step(self, epoch: int, window: _Window, stop: _StopRequest) -> None:
        s, step = self.s, self.step
        epoch_end = step % self.steps_per_epoch == 0
        last = step >= self.total_steps
        if step % s.log_every == 0 or last:
            self._log_train(epoch, window)
        if (s.eval_every and step % s.eval_every == 0) or epoch_end or last:
            self._validate()
        stopping = self._stop_requested(stop)
        if (s.checkpoint_every and step % s.checkpoint_every == 0) or epoch_end or last or stopping:
            self._save_checkpoint()
        if self.on_step is not None:
            with self._pause():
                self.on_step(
                    StepInfo(step, self.total_steps, epoch, float(window.last_loss), self._lr(), self.run_dir)
                )
        if stopping:
            path = ckpt.checkpoint_dir(self.run_dir, step)
            raise TrainingInterrupted(
                f"stopped by {stop.signal} at step {step}/{self.total_steps}; checkpoint {path}; "
                "continue with `vembed train ... --resume`",
                path,
            )

    # -- one optimiser step -----------------------------------------------------------------------

    def _epoch_steps(self, epoch: int) -> Iterator[list]:
        """The micro-batch groups (``grad_accum`` each) of the optimiser steps left in ``epoch``."""
        accum = self.s.grad_accum
        batches = epoch_batches(self.sampler, epoch)[: self.steps_per_epoch * accum]
        first = (self.step - epoch * self.steps_per_epoch) * accum
        if self.cached:
            source = (self._cached_batch(b) for b in batches[first:])
        else:
            loader = epoch_loader(
                self.data, batches, spec=self.embedder.spec, settings=self.settings, epoch=epoch, first=first
            )
            source = (self._pixel_batch(b) for b in loader)
        group = []
        for micro in source:
            group.append(micro)
            if len(group) == accum:
                yield group
                group = []

    def _pixel_batch(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        for bad in batch.bad:
            log(f"[yellow]skipped:[/] {bad.message}")
        if not len(batch.indices):
            raise VembedError("every image of a training batch failed to decode (see the lines above)")
        labels = torch.tensor([self.data.labels[i] for i in batch.indices.tolist()], dtype=torch.long)
        device = self.accelerator.device
        return batch.pixel_values.to(device, non_blocking=True), labels.to(device)

    def _cached_batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.tensor(indices, dtype=torch.long)
        return self.features[idx].to(self.accelerator.device), self.feature_labels[idx].to(
            self.accelerator.device
        )

    def _optimizer_step(self, group: list) -> tuple[float, int]:
        acc = self.accelerator
        total, count = 0.0, 0
        for inputs, labels in group:
            with acc.accumulate(self.model):
                loss = self._forward_backward(inputs, labels)
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

    def _forward_backward(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        acc = self.accelerator
        if self.cached:
            with acc.autocast():
                loss = self.loss(self.embedder.head(inputs), labels)
            acc.backward(loss)
            return loss.detach()
        if self.s.grad_cache_chunk and self.s.grad_cache_chunk < len(inputs):
            return grad_cache_backward(
                self.model,
                inputs,
                labels,
                self.loss,
                chunk_size=self.s.grad_cache_chunk,
                backward=acc.backward,
                no_sync=lambda: acc.no_sync(self.model),
            )
        loss = self.loss(self.model(inputs), labels)
        acc.backward(loss)
        return loss.detach()

    def _sync_outside_grads(self) -> None:
        if self.accelerator.num_processes == 1:
            return
        for p in self.outside:
            if p.grad is not None:
                p.grad = self.accelerator.reduce(p.grad, reduction="mean")

    # -- validation, logging, checkpoints ---------------------------------------------------------

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
        if self.validator is None or self.last_validated == self.step:
            return
        with self._pause():
            self._run_validation()

    def _run_validation(self) -> None:
        acc = self.accelerator
        self.last_validated = self.step
        if acc.is_main_process:
            embedder = self.embedder
            metrics = self.validator(embedder, autocast=acc.autocast, show_progress=self.show_progress)
            set_train_mode(embedder, self.s.method)
            row = {"kind": "val", "step": self.step, "epoch": self._epoch(), **metrics}
            self.history.append(row)
            self.metrics.append(row)
            improved = self.best is None or _rank_key(metrics) >= _rank_key(self.best)
            self._say(
                f"step {self.step}: validation "
                + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith(("recall", "map")))
                + (" [green](best)[/]" if improved else "")
            )
            if improved:
                self.best = row
                self._save_model(self.run_dir / BEST_DIR, selected="best", row=row)
        acc.wait_for_everyone()

    def _log_train(self, epoch: int, window: _Window) -> None:
        loss = self.accelerator.reduce(torch.tensor(window.loss, device=self.accelerator.device), "mean")
        row = {
            "kind": "train",
            "step": self.step,
            "epoch": self._epoch(),
            "loss": float(loss),
            "lr": self._lr(),
            "images_per_second": window.rate,
        }
        self.metrics.append(row)
        window.reset()

    def _track(self, row: dict) -> None:
        if self.accelerator.trackers:
            values = {f"{row['kind']}/{k}": v for k, v in row.items() if isinstance(v, float)}
            self.accelerator.log(values, step=row["step"])

    def _save_checkpoint(self) -> None:
        if self.last_saved == self.step:
            return
        with self._pause():
            self._write_checkpoint()

    def _write_checkpoint(self) -> None:
        acc = self.accelerator
        tmp = ckpt.begin(self.run_dir, self.step)
        acc.wait_for_everyone()
        if acc.is_main_process:
            ckpt.write_main(
                tmp,
                model_state=trainable_state(self.embedder, self.loss),
                optimizer=self.optimizer,
                state=self._state(),
            )
        ckpt.write_rng(tmp, acc.process_index)
        acc.wait_for_everyone()
        if acc.is_main_process:
            ckpt.commit(tmp, ckpt.checkpoint_dir(self.run_dir, self.step), keep=self.s.keep_checkpoints)
        acc.wait_for_everyone()
        self.last_saved = self.step

    def _state(self) -> dict:
        scaler = self.accelerator.scaler
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "epoch": self._epoch(),
            "images": self.images,
            "train_seconds": self.train_seconds,
            "last_validated": self.last_validated,
            "window": self.window.state(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "best": self.best,
            "history": self.history,
            "settings": self.settings.model_dump(mode="json"),
        }

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
        state = ckpt.read_state(path)
        _check_resumable(state.get("settings", {}), self.settings, path)
        if state["steps_per_epoch"] != self.steps_per_epoch:
            raise VembedError(
                f"{path}: saved with {state['steps_per_epoch']} steps per epoch, now {self.steps_per_epoch} "
                "(different data or number of processes); resume with the same ones"
            )
        load_trainable_state(self.embedder, self.loss, ckpt.load_model_state(path), where=str(path))
        ckpt.load_optimizer(path, self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") and acc.scaler is not None:
            acc.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        self.images = state["images"]
        self.train_seconds = state["train_seconds"]
        self.history = state["history"]
        self.best = state["best"]
        self.last_validated = state["last_validated"]
        self.window.load(state["window"])
        self.last_saved = self.step
        self.resumed_from = path
        self._discard_after(self.step)
        ckpt.load_rng(path, acc.process_index)
        acc.wait_for_everyone()
        self._say(f"resumed from {path} (step {self.step}/{self.total_steps})")

    def _discard_after(self, step: int) -> None:
        """Forget what a killed run wrote after its last checkpoint; resuming writes it again."""
        self.metrics.resume(step)
        best_dir = self.run_dir / BEST_DIR
        if self.accelerator.is_main_process and best_dir.is_dir() and _saved_step(best_dir) > step:
            shutil.rmtree(best_dir)

    # -- the model written at the end -------------------------------------------------------------

    def _finish(self) -> tuple[Path, str]:
        acc = self.accelerator
        final = self.run_dir / FINAL_DIR
        best = self.run_dir / BEST_DIR
        if _saved_training(final).get("finished_step") == self.step and not best.is_dir():
            return final, _saved_selection(final)  # resumed a run that had already finished
        selected = "best" if self.validator is not None and best.is_dir() else "last"
        if acc.is_main_process:
            if selected == "best":
                with atomic_dir(final) as tmp:
                    shutil.copytree(best, tmp, dirs_exist_ok=True)
                    config = json.loads((tmp / VEMBED_CONFIG).read_text())
                    config["training"]["finished_step"] = self.step
                    write_json(tmp / VEMBED_CONFIG, config)
                shutil.rmtree(best)
            else:
                self._save_model(final, selected="last", row=None)
            which = f"best validation {PRIMARY_METRIC}" if selected == "best" else "last step"
            self._say(f"final model ({which}): {final}")
            plot = plot_metrics(self.metrics.rows, self.run_dir / PLOT_FILE, title=str(self.run_dir))
            if plot is not None:
                self._say(f"curves: {plot}")
        acc.wait_for_everyone()
        return final, selected

    def _save_model(self, out: Path, *, selected: str, row: dict | None) -> None:
        """A merged, self-contained model folder (LoRA folded into the backbone weights)."""
        merged = merge_lora(self.embedder)
        training = {
            "selected": selected,
            "step": self.step,
            "total_steps": self.total_steps,
            "method": self.s.method,
            "loss": self.s.loss,
            "metrics": {k: v for k, v in (row or {}).items() if k not in ("kind",)},
            "run_dir": str(self.run_dir),
            "finished_step": self.step if selected == "last" else None,  # set in final/ when the run ends
        }
        with atomic_dir(out) as tmp:
            save_embedder(merged, tmp, extra={"training": training}, task_head=self._task_head())

    def _classifier(self):
        """The classifier the loss trains (``ce``), with the training class names; None otherwise."""
        return classifier_of_loss(self.loss, self.data.class_names)

    def _task_head(self) -> tuple[dict, dict] | None:
        head = self._classifier()
        return head.task_head() if head is not None else None

    # -- small helpers ----------------------------------------------------------------------------

    def _cache_features(self) -> tuple[torch.Tensor, list[int]] | None:
        acc, data = self.accelerator, self.settings.data
        options = dict(
            batch_size=self.settings.eval.batch_size,
            num_workers=data.num_workers,
            skip_bad=data.skip_bad,
            show_progress=self.show_progress and acc.is_main_process,
        )
        devices = [acc.device] if acc.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), acc.autocast():
            cached = embed_records(
                self.embedder, self.data.records, pooled=True, description="caching features", **options
            )
            if cached.problems:
                self.data = self.data.subset(cached.indices)
            self.features = cached.embeddings
            self.feature_labels = torch.tensor(self.data.labels, dtype=torch.long)
            if self.val is None:
                return None
            val = embed_records(
                self.embedder,
                self.val.records,
                pooled=True,
                description="caching validation features",
                **options,
            )
        return val.embeddings, val.indices

    def _report_problems(self) -> None:
        for what, data in (("training", self.data), ("validation", self.val)):
            if data is not None and data.problems:
                log(f"[yellow]skipped {len(data.problems)} bad {what} records[/] (first: {data.problems[0]})")

    def _say(self, message: str) -> None:
        if self.show_progress and self.accelerator.is_main_process:
            log(message)

    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"]) if hasattr(self, "optimizer") else 0.0

    def _epoch(self) -> float:
        return round(self.step / self.steps_per_epoch, 4)

    def _stop_requested(self, stop: _StopRequest) -> bool:
        flag = stop.signal is not None
        if self.accelerator.num_processes > 1:
            t = torch.tensor(float(flag), device=self.accelerator.device)
            flag = bool(self.accelerator.reduce(t, reduction="sum") > 0)
            if flag and stop.signal is None:
                stop.signal = "a stop signal on another process"
        return flag


class _Window:
    """Running loss and throughput since the last log row."""

    def __init__(self):
        self.reset()
        self.last_loss = float("nan")

    def reset(self) -> None:
        self.loss_sum, self.steps, self.images, self.seconds = 0.0, 0, 0, 0.0

    def add(self, loss, images: int, seconds: float) -> None:
        self.loss_sum = (
            self.loss_sum + loss.detach() if isinstance(loss, torch.Tensor) else self.loss_sum + loss
        )
        self.steps += 1
        self.images += images
        self.seconds += seconds
        self.last_loss = loss

    @property
    def loss(self) -> float:
        return float(self.loss_sum / self.steps) if self.steps else float(self.last_loss)

    def state(self) -> dict:
        return {
            "loss_sum": float(self.loss_sum),
            "steps": self.steps,
            "images": self.images,
            "seconds": self.seconds,
        }

    def load(self, state: dict) -> None:
        self.loss_sum, self.steps = state["loss_sum"], state["steps"]
        self.images, self.seconds = state["images"], state["seconds"]

    @property
    def rate(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


class _StopRequest:
    """SIGTERM / first Ctrl-C: finish the current step, save a checkpoint, stop. Second Ctrl-C: abort."""

    def __init__(self):
        self.signal: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        log(f"[yellow]{self.signal}:[/] finishing this step and saving a checkpoint (Ctrl-C again to abort)")


def _rank_key(metrics: dict) -> tuple[float, float]:
    """Validation order: recall@1, then MAP@R; a later model that ties is preferred (``>=``), so a
    validation set too easy to move never keeps the untrained model as the result."""
    return metrics[PRIMARY_METRIC], metrics.get("map@r", 0.0)


def _field(name: str, fmt: str):
    from rich.progress import TextColumn

    return TextColumn(f"{name} {fmt}")


def _make_accelerator(settings: Settings) -> Accelerator:
    s = settings.train
    kwargs: dict = {
        "mixed_precision": s.precision,
        "gradient_accumulation_steps": s.grad_accum,
        # on a machine without an accelerator, accelerate runs several processes (torchrun) only with cpu=True
        "cpu": resolve_device(settings.model.device).type == "cpu",
        # train.compile: accelerate wraps the prepared model in torch.compile (inductor)
        "dynamo_backend": "inductor" if s.compile else "no",
    }
    from accelerate.utils import is_tensorboard_available

    if is_tensorboard_available():
        kwargs.update(log_with="tensorboard", project_dir=str(s.output_dir))
    try:
        accelerator = Accelerator(**kwargs)
    except (ValueError, RuntimeError) as exc:
        raise VembedError(f"train.precision={s.precision}: {exc}") from None
    if accelerator.distributed_type == DistributedType.FSDP:
        raise VembedError(
            "FSDP is not supported by vembed's checkpoints yet: use DDP (`accelerate launch --multi_gpu`); "
            "ViT backbones up to dinov2-giant fit one GPU with bf16 and train.grad_checkpointing=true"
        )
    if accelerator.trackers == [] and kwargs.get("log_with"):
        accelerator.init_trackers("vembed")
    return accelerator


def _release_accelerator() -> None:
    """Forget accelerate's process-wide state so a later train() may use other settings (notebooks, tests)."""
    AcceleratorState._reset_state()
    GradientState._reset_state()


@contextlib.contextmanager
def _deterministic(enabled: bool):
    if not enabled:
        yield
        return
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark = benchmark


def _check_resumable(saved: dict, settings: Settings, path: Path) -> None:
    now = _flatten(settings.model_dump(mode="json"))
    before = _flatten(saved)
    changed = [
        f"{key} ({before.get(key)!r} -> {now.get(key)!r})"
        for key in sorted(set(now) | set(before))
        if key not in _RESUMABLE_CHANGES
        and before.get(key) != now.get(key)
        and key.split(".")[0] in ("model", "data", "train")
    ]
    if changed:
        raise VembedError(
            f"{path}: the settings changed since this checkpoint: {'; '.join(changed[:5])}. "
            "Resume with the same settings, or train into a new train.output_dir"
        )


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key != "loss_options":
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _saved_training(model_dir: Path) -> dict:
    try:
        return json.loads((model_dir / VEMBED_CONFIG).read_text())["training"]
    except (OSError, KeyError, ValueError, TypeError):
        return {}


def _saved_step(model_dir: Path) -> int:
    """The step a saved model folder was written at (huge when unknown: treat it as newer)."""
    try:
        return int(_saved_training(model_dir)["step"])
    except (KeyError, ValueError, TypeError):
        return 1 << 62


def _saved_selection(model_dir: Path) -> str:
    return _saved_training(model_dir).get("selected", "last")


__all__ = ["StepInfo", "TrainResult", "TrainingInterrupted", "check_settings", "train"]
