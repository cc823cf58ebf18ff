"""Checks before and at the start of a run: every mistake found without loading a model or reading data,
settings that fail only with several processes, and settings a resumed run may not change."""

from __future__ import annotations

import difflib
from pathlib import Path

from vembed.data.records import folder_given_message
from vembed.errors import VembedError
from vembed.settings import Settings
from vembed.tasks import Task, check_task_keys, get_task
from vembed.training import checkpoint as ckpt
from vembed.training.metrics import METRICS_FILE

FINAL_DIR = "final"
# Settings a resumed run may change: they do not alter what is trained.
RESUMABLE_CHANGES = {
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


def check_settings(settings: Settings) -> None:
    """Every mistake that can be found without loading a model or reading data."""
    s = settings.train
    if settings.data.train is None:
        raise VembedError(
            "data.train is not set: give the training records (JSONL), e.g. data.train=train.jsonl"
        )
    for key in ("train", "val"):
        path = getattr(settings.data, key)
        if path is not None and Path(path).is_dir():
            raise VembedError(f"data.{key}: {folder_given_message(Path(path))}")
        if path is not None and not Path(path).is_file():
            raise VembedError(f"data.{key}: records file not found: {path}")
    task = get_task(s.task)
    check_task_keys(task, s)
    task.check(settings)
    check_select_metric(settings, task)
    if s.scheduler == "step" and s.step_epochs is None:
        raise VembedError(
            "train.scheduler=step needs train.step_epochs (lr x train.step_gamma every N epochs)"
        )
    run_dir = Path(s.output_dir)
    if not s.resume and any(
        (run_dir / name).exists() for name in (ckpt.CHECKPOINTS, FINAL_DIR, METRICS_FILE)
    ):
        raise VembedError(
            f"train.output_dir={run_dir} already holds a run; continue it with --resume "
            "(train.resume=true) or choose another train.output_dir"
        )


def check_select_metric(settings: Settings, task: Task) -> None:
    """``train.select_metric`` must be a metric the task's validation reports."""
    s = settings.train
    metric = task.select_metric(settings)
    reported = task.metrics(settings)
    if metric not in reported:
        close = difflib.get_close_matches(metric, reported, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise VembedError(
            f"train.select_metric={s.select_metric!r} is not a metric this run's validation reports{hint}; "
            f"with {task.describe(settings)} it reports: {', '.join(reported)}"
        )


def check_processes(settings: Settings, num_processes: int) -> None:
    """Settings that only fail with several processes (DDP)."""
    if num_processes > 1 and settings.data.skip_bad:
        raise VembedError(
            "data.skip_bad=true with several processes: a batch that loses an image would give the ranks "
            "unequal batches for the cross-device loss. Drop bad images first "
            "(`vembed prepare jsonl FILE --check-images --skip-bad`), then train without data.skip_bad"
        )


def check_resumable(saved: dict, settings: Settings, path: Path) -> None:
    """The settings a checkpoint was saved with must match, except :data:`RESUMABLE_CHANGES`."""
    now = _flatten(settings.model_dump(mode="json"))
    before = _flatten(saved)
    changed = [
        f"{key} ({before.get(key)!r} -> {now.get(key)!r})"
        for key in sorted(set(now) | set(before))
        if key not in RESUMABLE_CHANGES
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
