"""`vembed mine` then `vembed train train.hard_negatives=K` end to end, re-mining (train.remine_every) exact
under resume, and the errors of both commands."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from training_data import checkpoint_weights, make_nuisance_dataset, max_abs_diff, one_thread, tiny_settings

from vembed.errors import VembedError
from vembed.inference import EmbedOptions
from vembed.mining import mine_file
from vembed.training import checkpoint as ckpt
from vembed.training import train

OPTIONS = ("train.method=full", "train.loss=triplet", "train.batch_size=16", "train.samples_per_class=4")


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


QUIET = EmbedOptions(num_workers=0, show_progress=False)


def _vembed(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(["vembed", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def mined(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("mine")
    train_file = make_nuisance_dataset(root / "train", num_classes=8, per_class=8, categories=2)
    out = train_file.parent / "mined.jsonl"
    with one_thread():
        mine_file(_embedder(tiny_model), train_file, out, k=4, options=QUIET)
    return train_file, out


def _embedder(tiny_model):
    from vembed.models.factory import create_embedder
    from vembed.settings import load_settings

    return create_embedder(str(tiny_model), load_settings(None, ["model.device=cpu"]).model)


def test_mine_then_train_with_hard_negatives_on_the_command_line(tiny_model, tmp_path):
    data = make_nuisance_dataset(tmp_path / "data", num_classes=8, per_class=8)
    mined_file = tmp_path / "data" / "mined.jsonl"
    run = _vembed(
        "mine", "--model", str(tiny_model), "--data", str(data), "--out", str(mined_file), "--k", "3",
        "--margin", "0.05", "model.device=cpu", "data.num_workers=0", cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout.strip().splitlines()[-1])  # the one JSON line on stdout
    assert len(run.stdout.strip().splitlines()) == 1
    assert summary["records"] == 64 and summary["k"] == 3 and summary["out"] == str(mined_file)
    assert summary["mean_negatives"] == pytest.approx(summary["negatives"] / 64)
    rows = [json.loads(line) for line in mined_file.read_text().splitlines()]
    labels = {row["image"]: row["label"] for row in rows}
    assert all(labels[n] != row["label"] for row in rows for n in row["negatives"])

    out = tmp_path / "run"
    run = _vembed(
        "train", f"model.name={tiny_model}", f"data.train={mined_file}", f"train.output_dir={out}",
        "train.hard_negatives=2", "train.max_steps=3", "data.num_workers=0", "model.device=cpu",
        *OPTIONS, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "hard negatives: each class a batch draws brings up to 2" in run.stderr
    assert (out / "final" / "vembed.json").is_file()


def test_cli_errors_are_one_line(tiny_model, tmp_path):
    data = make_nuisance_dataset(tmp_path / "data", num_classes=2, per_class=2)
    cases = [
        (["--model", "no-such-model-xyz", "--data", str(data)], "no-such-model-xyz"),
        (["--model", str(tiny_model), "--data", str(tmp_path / "missing.jsonl")], "records file not found"),
        (["--model", str(tiny_model), "--data", str(data), "--k", "0"], "--k must be a positive integer"),
    ]
    for args, message in cases:
        run = _vembed("mine", *args, "--out", str(tmp_path / "data" / "o.jsonl"), cwd=tmp_path)
        assert run.returncode != 0
        lines = [line for line in run.stderr.strip().splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in run.stderr, run.stderr


def test_hard_negatives_without_mined_records_says_to_run_vembed_mine(tiny_model, mined, tmp_path):
    plain, _ = mined
    settings = tiny_settings(tiny_model, plain, tmp_path / "run", *OPTIONS, "train.hard_negatives=2")
    with pytest.raises(VembedError, match=r"have no 'negatives': mine them first, `vembed mine"):
        train(settings, show_progress=False)
    settings = tiny_settings(tiny_model, plain, tmp_path / "run", *OPTIONS, "train.remine_every=1")
    with pytest.raises(
        VembedError, match="train.remine_every re-mines the negatives of train.hard_negatives"
    ):
        train(settings, show_progress=False)
    shuffled = tiny_settings(tiny_model, plain, tmp_path / "r2", "train.loss=ce", "train.hard_negatives=2")
    with pytest.raises(VembedError, match=r"train.hard_negatives needs P x K batches"):
        train(shuffled, show_progress=False)


REMINE = (*OPTIONS, "train.hard_negatives=2", "train.remine_every=1", "train.max_steps=7")


@pytest.fixture(scope="module")
def remined_reference(tiny_model, mined, tmp_path_factory):
    _, mined_file = mined
    out = tmp_path_factory.mktemp("remine") / "run"
    with one_thread():
        return train(tiny_settings(tiny_model, mined_file, out, *REMINE), show_progress=False)


def test_remining_replaces_the_negatives_and_is_saved_in_checkpoints(remined_reference, mined):
    _, mined_file = mined
    run_dir = remined_reference.run_dir
    assert (
        remined_reference.steps == 7
    )  # 4 batches of 16 per epoch: epoch 0, then 3 steps of epoch 1 (re-mined)
    state = json.loads((ckpt.checkpoint_dir(run_dir, 7) / "state.json").read_text())
    assert state["sampler"]["mined_epoch"] == 1
    negatives = state["sampler"]["negatives"]
    rows = [json.loads(line) for line in mined_file.read_text().splitlines()]
    images = [row["image"] for row in rows]
    from_file = [[images.index(n) for n in row["negatives"]] for row in rows]
    assert len(negatives) == 64 and negatives != from_file  # mined again with the trained model
    labels = [row["label"] for row in rows]
    assert all(labels[j] != labels[i] for i, row in enumerate(negatives) for j in row)


def test_remining_resumes_exactly(tiny_model, mined, tmp_path, remined_reference):
    _, mined_file = mined
    out = tmp_path / "run"

    def crash(info):
        if info.step == 6:  # mid epoch 1, after its re-mining
            raise RuntimeError("simulated crash")

    settings = tiny_settings(tiny_model, mined_file, out, *REMINE, "train.checkpoint_every=5")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(settings, show_progress=False, on_step=crash)
    resumed = train(
        tiny_settings(tiny_model, mined_file, out, *REMINE, "train.checkpoint_every=5", "train.resume=true"),
        show_progress=False,
    )
    assert resumed.resumed_from.name == "step-0000005"
    last = ckpt.checkpoint_dir(out, 7)
    reference = ckpt.checkpoint_dir(remined_reference.run_dir, 7)
    assert max_abs_diff(checkpoint_weights(last), checkpoint_weights(reference)) <= 1e-6


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")
def test_two_processes_train_on_mined_negatives_and_remine_once(tiny_model, mined, tmp_path):
    _, mined_file = mined
    out = tmp_path / "run"
    args = [
        f"model.name={tiny_model}", f"data.train={mined_file}", f"train.output_dir={out}",
        "data.num_workers=0", "train.method=lora", "model.projection_dim=8", "train.loss=triplet",
        "train.batch_size=16", "train.samples_per_class=4", "train.hard_negatives=2", "train.remine_every=1",
        "train.max_steps=3",  # 64 images / (16 x 2 processes): 2 steps per epoch, re-mined once
    ]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "vembed", "train", *args],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("re-mined hard negatives") == 1  # the main process mines, the other receives
    state = json.loads((ckpt.checkpoint_dir(out, 3) / "state.json").read_text())
    assert state["steps_per_epoch"] == 2 and state["sampler"]["mined_epoch"] == 1
