"""Never lose work: a run stopped anywhere (crash, kill, SIGTERM, kill while saving) and resumed ends with
the same weights and validation history as a run that was not stopped.

Tolerance: on CPU the resumed run is bit-identical (asserted to 1e-6); the subprocess kill allows 1e-5
since the two runs live in different processes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from training_data import (
    checkpoint_weights,
    make_nuisance_dataset,
    max_abs_diff,
    one_thread,
    tiny_settings,
)

from vembed.errors import VembedError
from vembed.training import TrainingInterrupted, train
from vembed.training import checkpoint as ckpt

# LoRA with dropout, P x K batches, augmentation, a learnable temperature: every source of randomness.
OPTIONS = (
    "train.method=lora",
    "train.lora.dropout=0.1",
    "train.loss=infonce",
    "train.learnable_temperature=true",
    "model.projection_dim=8",
    "train.max_steps=10",  # 8 steps per epoch: the run crosses an epoch end
    "train.checkpoint_every=3",
    "train.keep_checkpoints=2",
    "train.eval_every=4",
)
TOLERANCE = 1e-6


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume-data")
    return make_nuisance_dataset(root / "train", per_class=8), make_nuisance_dataset(
        root / "val", per_class=3, seed=1
    )


@pytest.fixture(scope="module")
def reference(tiny_model, data, tmp_path_factory):
    """The uninterrupted run."""
    with one_thread():
        out = tmp_path_factory.mktemp("reference") / "run"
        result = train(tiny_settings(tiny_model, data[0], out, *OPTIONS, val=data[1]), show_progress=False)
    return result


def _settings(tiny_model, data, out, *extra):
    return tiny_settings(tiny_model, data[0], out, *OPTIONS, *extra, val=data[1])


def _assert_same_run(result, reference, tolerance=TOLERANCE):
    assert result.steps == reference.steps == 10
    last = ckpt.checkpoint_dir(result.run_dir, 10)
    assert (
        max_abs_diff(
            checkpoint_weights(last), checkpoint_weights(reference.run_dir / last.relative_to(result.run_dir))
        )
        <= tolerance
    )
    assert [h["step"] for h in result.history] == [h["step"] for h in reference.history] == [0, 4, 8, 10]
    for mine, theirs in zip(result.history, reference.history, strict=True):
        assert mine["recall@1"] == pytest.approx(theirs["recall@1"], abs=tolerance)
        assert mine["map@r"] == pytest.approx(theirs["map@r"], abs=tolerance)
    assert result.best["step"] == reference.best["step"]
    final = load_file(str(result.final_dir / "model.safetensors"))
    assert max_abs_diff(final, load_file(str(reference.final_dir / "model.safetensors"))) <= tolerance
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(line) for line in (reference.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in rows] == [(r["kind"], r["step"]) for r in ref_rows]
    for mine, theirs in zip(rows, ref_rows, strict=True):
        if mine["kind"] == "train":
            assert mine["loss"] == pytest.approx(theirs["loss"], abs=1e-5)


def test_checkpoints_are_kept_up_to_the_retention_limit(reference):
    names = [p.name for p in ckpt.list_checkpoints(reference.run_dir)]
    assert names == ["step-0000009", "step-0000010"]
    files = {p.name for p in (reference.run_dir / "checkpoints" / "step-0000010").iterdir()}
    assert files == {
        "model.safetensors",
        "optimizer.safetensors",
        "optimizer.json",
        "state.json",
        "rng-0.safetensors",
    }
    weights = checkpoint_weights(reference.run_dir / "checkpoints" / "step-0000010")
    assert "loss.log_temperature" in weights and "projection.weight" in weights
    assert all("lora_" in k for k in weights if k.startswith("backbone."))  # frozen weights are not copied


def test_crash_mid_epoch_and_resume_matches_uninterrupted_run(tiny_model, data, tmp_path, reference):
    out = tmp_path / "run"

    def crash(info):
        if info.step == 5:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(_settings(tiny_model, data, out), show_progress=False, on_step=crash)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-0000003"]  # 4 and 5 are lost
    assert not (out / "final").exists()
    # the validation at step 4 (after the checkpoint) was logged and will be redone
    assert any(json.loads(line)["step"] == 4 for line in (out / "metrics.jsonl").read_text().splitlines())

    result = train(_settings(tiny_model, data, out, "train.resume=true"), show_progress=False)
    assert result.resumed_from == out / "checkpoints" / "step-0000003"
    _assert_same_run(result, reference)


def test_resume_with_other_worker_count_sees_the_same_augmentations(tiny_model, data, tmp_path, reference):
    out = tmp_path / "run"

    def crash(info):
        if info.step == 7:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError):
        train(_settings(tiny_model, data, out), show_progress=False, on_step=crash)
    result = train(
        _settings(tiny_model, data, out, "train.resume=true", "data.num_workers=1"), show_progress=False
    )
    assert result.resumed_from.name == "step-0000006"
    _assert_same_run(result, reference)


def test_sigterm_saves_a_checkpoint_and_stops(tiny_model, data, tmp_path, reference):
    out = tmp_path / "run"

    def send_sigterm(info):
        if info.step == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted, match="stopped by SIGTERM at step 5/10") as exc:
        train(_settings(tiny_model, data, out), show_progress=False, on_step=send_sigterm)
    assert signal.getsignal(signal.SIGTERM) is previous  # handlers restored
    assert exc.value.checkpoint == out / "checkpoints" / "step-0000005"
    assert (exc.value.checkpoint / "state.json").is_file()
    result = train(_settings(tiny_model, data, out, "train.resume=true"), show_progress=False)
    assert result.resumed_from.name == "step-0000005"
    _assert_same_run(result, reference)


def test_kill_while_saving_keeps_the_last_good_checkpoint(tiny_model, data, tmp_path, reference, monkeypatch):
    out = tmp_path / "run"
    real_write_rng = ckpt.write_rng
    calls = []

    def dies_on_second_save(tmp, rank):
        calls.append(tmp)
        if len(calls) == 2:
            (tmp / "rng-0.safetensors").write_bytes(b"half a file")
            raise KeyboardInterrupt  # killed in the middle of writing step 6
        real_write_rng(tmp, rank)

    monkeypatch.setattr(ckpt, "write_rng", dies_on_second_save)
    with pytest.raises(KeyboardInterrupt):
        train(_settings(tiny_model, data, out), show_progress=False)
    monkeypatch.setattr(ckpt, "write_rng", real_write_rng)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-0000003"]
    assert (out / "checkpoints" / ".step-0000006.tmp").is_dir()  # the half-written one is not visible
    state = ckpt.read_state(out / "checkpoints" / "step-0000003")
    assert state["step"] == 3

    result = train(_settings(tiny_model, data, out, "train.resume=true"), show_progress=False)
    assert not list((out / "checkpoints").glob(".step-*"))
    _assert_same_run(result, reference)


def test_resume_refuses_changed_settings(tiny_model, data, tmp_path):
    out = tmp_path / "run"

    def crash(info):
        if info.step == 3:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        train(_settings(tiny_model, data, out), show_progress=False, on_step=crash)
    with pytest.raises(
        VembedError, match=r"settings changed since this checkpoint: train\.lr \(0\.001 -> 0\.002\)"
    ):
        train(_settings(tiny_model, data, out, "train.resume=true", "train.lr=2e-3"), show_progress=False)


def test_resume_without_checkpoint_starts_over(tiny_model, data, tmp_path, reference):
    result = train(_settings(tiny_model, data, tmp_path / "run", "train.resume=true"), show_progress=False)
    assert result.resumed_from is None
    _assert_same_run(result, reference)


def test_sigkill_of_the_cli_and_resume(tiny_model, data, tmp_path, reference):
    """A real kill -9 of `python -m vembed train` at an arbitrary moment (possibly while saving)."""
    out = tmp_path / "run"
    args = [f"{k}" for k in _cli_args(tiny_model, data, out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vembed", "train", *args, "train.checkpoint_every=1", "--quiet"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if len(ckpt.list_checkpoints(out)) >= 1:
                break
            time.sleep(0.01)
    finally:
        proc.kill()
        _, stderr = proc.communicate()
    assert ckpt.list_checkpoints(out), stderr.decode()
    result = train(
        _settings(tiny_model, data, out, "train.resume=true", "train.checkpoint_every=1"), show_progress=False
    )
    _assert_same_run(result, reference, tolerance=1e-5)


def _cli_args(tiny_model, data, out: Path) -> list[str]:
    """The same settings as ``key=value`` arguments."""

    def flatten(prefix: str, values: dict) -> list[str]:
        flat = []
        for key, value in values.items():
            if isinstance(value, dict):
                flat += flatten(f"{prefix}{key}.", value) if value else []
            else:  # null too: train.augment's null keys are the task's defaults, not "not given"
                value = ",".join(map(str, value)) if isinstance(value, list) else value
                flat.append(f"{prefix}{key}={'null' if value is None else value}")
        return flat

    settings = _settings(tiny_model, data, out)
    return [
        arg
        for section in ("model", "data", "train", "eval")
        for arg in flatten(f"{section}.", getattr(settings, section).model_dump(mode="json"))
    ]


def test_resuming_a_finished_run_changes_nothing(tiny_model, data, tmp_path, reference):
    out = tmp_path / "copy"
    shutil.copytree(reference.run_dir, out)
    before = {p.name: p.read_bytes() for p in (out / "final").iterdir()}
    result = train(_settings(tiny_model, data, out, "train.resume=true"), show_progress=False)
    assert result.steps == 10 and result.selected == reference.selected
    assert result.best == reference.best and result.history == reference.history
    assert {p.name: p.read_bytes() for p in (out / "final").iterdir()} == before
