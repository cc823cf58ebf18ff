"""Several processes (DDP over gloo on the CPU, as `accelerate launch` / `torchrun` start it): sharded
P x K batches, negatives gathered from every process, one checkpoint with each process' random state."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from training_data import make_nuisance_dataset

from vembed.models.factory import create_embedder

pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")


def _torchrun(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "vembed", "train", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_two_processes_train_checkpoint_and_resume(tiny_model, tmp_path):
    train_file = make_nuisance_dataset(tmp_path / "train", per_class=8)
    val_file = make_nuisance_dataset(tmp_path / "val", per_class=2, seed=1)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [
        f"model.name={tiny_model}",
        f"data.train={train_file}",
        f"data.val={val_file}",
        f"train.output_dir={out}",
        "data.num_workers=0",
        "train.batch_size=8",  # per process: 64 images / (8 x 2 processes) = 4 steps per epoch
        "train.epochs=2",
        "train.loss=infonce",
        "model.projection_dim=8",
        "eval.k=1",
    ]
    done = _torchrun([*args, "train.max_steps=6"], env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("vembed train:") == 1  # the summary comes from the main process only
    last = out / "checkpoints" / "step-0000006"
    assert {"rng-0.safetensors", "rng-1.safetensors"} <= {p.name for p in last.iterdir()}
    state = json.loads((last / "state.json").read_text())
    assert state["steps_per_epoch"] == 4 and state["step"] == 6
    assert [row["step"] for row in state["history"]] == [0, 4, 6]
    assert create_embedder(str(out / "final")).embed_dim == 8

    # both processes load the checkpoint (each its own random state); the finished run stays as it is
    before = (out / "final" / "model.safetensors").read_bytes()
    resumed = _torchrun([*args, "train.max_steps=6", "--resume"], env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "step 6/6" in resumed.stderr
    assert (out / "final" / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize(
    "method",
    [["train.method=full"], ["train.method=frozen"], ["train.method=full", "train.grad_cache_chunk=4"]],
)
def test_two_processes_train_every_method(tiny_model, tmp_path, method):
    """DDP refuses a step in which a trainable parameter got no gradient (DINOv2's mask token is only
    used for masked-image modelling): full fine-tuning and a frozen backbone must train as LoRA does."""
    train_file = make_nuisance_dataset(tmp_path / "train", per_class=8)
    out = tmp_path / "run"
    args = [
        f"model.name={tiny_model}", f"data.train={train_file}", f"train.output_dir={out}",
        "data.num_workers=0", *method, "train.batch_size=8", "train.loss=infonce",
        "model.projection_dim=8", "train.max_steps=2",
    ]  # fmt: skip
    done = _torchrun(args, {**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert create_embedder(str(out / "final")).embed_dim == 8
