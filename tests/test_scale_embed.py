"""Sharded stores: several processes (torchrun over gloo on the CPU), resume after a kill, --append,
and a long JSONL read in bounded memory."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import make_image_dataset, save_tiny_model
from typer.testing import CliRunner

from vembed.cli import app
from vembed.errors import VembedError
from vembed.index.shards import embed_shards, job_dir
from vembed.index.store import open_store, store_shards
from vembed.inference import EmbedOptions
from vembed.models.factory import create_embedder

runner = CliRunner()


QUIET = EmbedOptions(num_workers=0, show_progress=False)


def run(*args, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, f"exit {result.exit_code}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny model, 14 images listed in a JSONL file, and the 1-process store of them (shards of 4)."""
    root = tmp_path_factory.mktemp("scale")
    model = save_tiny_model(root / "model")
    records = make_image_dataset(root / "data", num_classes=2, per_class=7)
    run(
        "embed",
        records,
        "--model",
        model,
        "--out",
        root / "one",
        "--shard-size",
        4,
        "-q",
        "data.num_workers=0",
    )
    return {"root": root, "model": model, "records": records, "one": open_store(root / "one")}


def same_store(a, b) -> None:
    assert a.paths == b.paths and a.labels == b.labels
    assert torch.allclose(a.embeddings, b.embeddings, atol=1e-6)


def test_one_process_store_is_sharded_in_source_order(data):
    store = data["one"]
    lines = [json.loads(line) for line in data["records"].read_text().splitlines()]
    assert store.paths == [str((data["records"].parent / row["image"]).resolve()) for row in lines]
    assert [s.count for s in store_shards(store.path)] == [4, 4, 4, 2]
    assert store.meta["count"] == 14 and store.probe is not None
    assert not job_dir(store.path).exists()


def embed_on_two_processes(launcher: list[str], data, out) -> None:
    """``LAUNCHER -m vembed embed`` of the records into ``out``; checks both processes took part."""
    done = subprocess.run(
        [sys.executable, "-m", *launcher, "-m", "vembed", "embed"]
        + [str(data["records"]), "--model", str(data["model"]), "--out", str(out), "--shard-size", "4", "-q"]
        + ["data.num_workers=0"],
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(out.parent / "hf")},  # no accelerate config
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on 2 processes" in done.stderr and done.stderr.count("embedded 14 images") == 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")
def test_two_processes_write_the_same_store_as_one(data, tmp_path):
    out = tmp_path / "two"
    embed_on_two_processes(
        ["torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"], data, out
    )
    same_store(open_store(out), data["one"])


@pytest.mark.skipif(
    importlib.util.find_spec("accelerate") is None, reason="accelerate (its launcher) is not installed"
)
def test_accelerate_launch_on_two_cpu_processes_writes_the_same_store_as_one(data, tmp_path):
    """--multi_gpu starts the processes through torch.distributed.run, with or without GPUs (--cpu with
    --num_processes 2 would start one: accelerate's multi-CPU mode needs MPI)."""
    out = tmp_path / "two"
    launcher = ["accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    launcher += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    embed_on_two_processes(launcher, data, out)
    same_store(open_store(out), data["one"])


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing cleans up."""


class KilledAfter:
    """An embedder whose process 'dies' (:class:`Killed`) after ``batches`` forward passes; counts images."""

    def __init__(self, embedder, batches: int | None = None):
        self.embedder, self.batches, self.images = embedder, batches, 0
        self.encode_orig = type(embedder).encode.__get__(embedder)

    def __call__(self, pixels, **kw):
        if self.batches is not None and self.batches == 0:
            raise Killed
        self.batches = None if self.batches is None else self.batches - 1
        self.images += len(pixels)
        return self.encode_orig(pixels, **kw)


def test_a_killed_process_resumes_only_its_missing_shards(data, tmp_path, monkeypatch):
    embedder = create_embedder(str(data["model"]))
    out = tmp_path / "store"
    common = dict(
        model=data["model"], shard_size=4, embed=EmbedOptions(4, num_workers=0, show_progress=False)
    )
    # process 0 of 2 finishes its shards (blocks 0 and 2); process 1 is killed after its first (block 1)
    embed_shards(embedder, data["records"], out, rank=0, world_size=2, finalize=False, **common)
    killed = KilledAfter(embedder, batches=1)
    monkeypatch.setattr(embedder, "encode", killed)
    with pytest.raises(Killed):
        embed_shards(embedder, data["records"], out, rank=1, world_size=2, **common)
    assert not out.exists() and killed.images == 4
    done = sorted(p.name for p in (job_dir(out) / "shards").glob("*.done.json"))
    assert done == ["p000-000000.done.json", "p000-000001.done.json", "p000-000002.done.json"]
    before = {p.name: p.stat().st_mtime_ns for p in (job_dir(out) / "shards").iterdir()}

    resumed = KilledAfter(embedder)
    monkeypatch.setattr(embedder, "encode", resumed)
    run_ = embed_shards(embedder, data["records"], out, **common)  # rerun alone: only block 3 is left
    assert run_.blocks_embedded == 1 and run_.blocks_reused == 3
    assert resumed.images == 2 + 1  # block 3's two images, and the probe image
    same_store(open_store(out), data["one"])
    after = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir() if p.name in before}
    assert after == {name: t for name, t in before.items() if name in after}  # nothing written twice


def test_a_killed_job_refuses_a_source_that_changed_under_its_finished_shards(data, tmp_path, monkeypatch):
    embedder = create_embedder(str(data["model"]))
    out = tmp_path / "store"
    common = dict(
        model=data["model"], shard_size=4, embed=EmbedOptions(4, num_workers=0, show_progress=False)
    )
    source = tmp_path / "records.jsonl"
    lines = data["records"].read_text().splitlines()
    source.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(embedder, "encode", KilledAfter(embedder, batches=1))
    with pytest.raises(Killed):  # block 0 finished, then killed
        embed_shards(embedder, source, out, image_root=data["records"].parent, **common)
    monkeypatch.undo()
    source.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")  # block 0 reordered
    with pytest.raises(VembedError, match=r"block 0 .* the source changed since"):
        embed_shards(embedder, source, out, image_root=data["records"].parent, **common)
    source.write_text("\n\n".join(lines) + "\n")  # the same records (blank lines do not count)
    embed_shards(embedder, source, out, image_root=data["records"].parent, **common)
    same_store(open_store(out), data["one"])


def test_processes_started_by_mpi_without_world_size_are_refused(data, tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    result = run("embed", data["records"], "--model", data["model"], "--out", tmp_path / "s", code=2)
    assert "OMPI_COMM_WORLD_SIZE" in result.stderr and "WORLD_SIZE is not set" in result.stderr
    assert not (tmp_path / "s").exists()


def test_an_unfinished_job_refuses_another_shard_size(data, tmp_path):
    embedder = create_embedder(str(data["model"]))
    out = tmp_path / "store"
    embed_shards(
        embedder, data["records"], out, model=data["model"], shard_size=4, rank=0, world_size=2,
        finalize=False, embed=QUIET,
    )  # fmt: skip
    with pytest.raises(VembedError, match=r"job.json: an unfinished embed with a different shard_size"):
        embed_shards(embedder, data["records"], out, model=data["model"], shard_size=5, embed=QUIET)


def test_append_equals_embedding_everything_at_once(data, tmp_path):
    lines = data["records"].read_text().splitlines()
    first = data["records"].with_name("first.jsonl")
    first.write_text("\n".join(lines[:9]) + "\n")
    out = tmp_path / "store"
    common = ("--model", data["model"], "--out", out, "--shard-size", 4, "-q", "data.num_workers=0")
    run("embed", first, *common)
    (out / "index.faiss").write_bytes(b"stale")
    (out / "index.json").write_text("{}")
    result = run("embed", data["records"], *common, "--append")  # the 9 already there are not embedded again
    assert "appended 5 images" in result.stderr and not (out / "index.faiss").exists()
    store = open_store(out)
    same_store(store, data["one"])
    assert store.meta["parts"] == 2 and [s.count for s in store_shards(out)] == [4, 4, 1, 3, 2]
    again = run("embed", data["records"], *common, "--append")
    assert "appended 0 images" in again.stderr and len(open_store(out)) == 14


def test_append_refuses_another_model(data, tmp_path):
    other = save_tiny_model(tmp_path / "other", seed=1)
    shutil.copytree(data["one"].path, tmp_path / "store")
    result = run(
        "embed", data["records"], "--model", other, "--out", tmp_path / "store", "--append", "-q", code=2
    )
    assert "--append needs the same model" in result.stderr.replace("\n", "")
    same_model_new_weights = tmp_path / "moved"
    shutil.copytree(other, same_model_new_weights)
    meta = json.loads((tmp_path / "store" / "meta.json").read_text())
    meta["model"]["source"] = str(same_model_new_weights)
    (tmp_path / "store" / "meta.json").write_text(json.dumps(meta))
    result = run(
        "embed", data["records"], "--model", same_model_new_weights, "--out", tmp_path / "store", "--append",
        code=2,
    )  # fmt: skip
    assert "no longer embeds the way it did" in result.stderr.replace("\n", "")


def test_a_long_jsonl_is_read_in_bounded_memory(tmp_path):
    """150 000 records: a list of them would take ~75 MB; reading them block by block stays flat."""
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(image)
    lines = tmp_path / "long.jsonl"
    with open(lines, "w") as fh:
        for i in range(150_000):
            fh.write(f'{{"image": "a.png", "label": {i % 1000}, "category": "c{i % 7}"}}\n')
    script = textwrap.dedent(
        f"""
        import resource, sys
        from vembed.index.blocks import iter_blocks
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        n = sum(len(b.records) for b in iter_blocks({str(lines)!r}, 10_000))
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(n, (after - before) // 1024)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    count, growth_mb = map(int, done.stdout.split())
    assert count == 150_000
    assert growth_mb < 25, f"peak RSS grew by {growth_mb} MB while streaming"


def test_several_processes_refuse_stdin(data, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr("vembed.processes.launched_processes", _two_fake_processes)
    result = run("embed", "-", "--model", data["model"], "--out", tmp_path / "s", code=2)
    assert "cannot share stdin" in result.stderr


def _two_fake_processes():
    import contextlib

    from vembed.processes import Processes

    return contextlib.nullcontext(Processes(0, 2))


def test_append_to_a_version_1_store(data, tmp_path):
    from vembed.data.records import read_records
    from vembed.index.embed import embed_to_store

    embedder = create_embedder(str(data["model"]))
    records = read_records(data["records"]).images()[:9]
    out = tmp_path / "store"
    embed_to_store(embedder, records, out, model=data["model"], options=QUIET)
    assert (out / "embeddings.safetensors").is_file()  # the single-file layout
    run(
        "embed",
        data["records"],
        "--model",
        data["model"],
        "--out",
        out,
        "--append",
        "-q",
        "data.num_workers=0",
    )
    store = open_store(out)
    same_store(store, data["one"])
    assert [s.count for s in store_shards(out)] == [9, 5] and store.probe is not None
