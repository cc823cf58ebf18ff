"""Exact retrieval metrics split across processes (gloo on the CPU) equal those of one process."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from conftest import make_image_dataset, save_tiny_model
from typer.testing import CliRunner

from vembed.cli import app
from vembed.evaluation.retrieval import retrieval_metrics
from vembed.processes import Processes

runner = CliRunner()


def _quantised(seed: int, n: int, classes: int, dim: int = 6):
    """Small-integer embeddings: every score is exact in float32, so the two paths see the same scores,
    with many exact ties and many queries whose first relevant item lies past the shortlist."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-2, 3, (n, dim), generator=g).float(), torch.randint(0, classes, (n,), generator=g)


def _cases():
    q, q_labels = _quantised(0, 400, 32)
    r, r_labels = _quantised(1, 240, 40)
    names = [f"c{int(x)}" for x in q_labels[:150]], [f"c{int(x)}" for x in r_labels]
    q_labels[0] = 99  # a class with a single item: skipped in all-vs-all, like one process does
    return [
        # (queries, labels, references, labels, per-process query shares, reference shares, ks, chunk)
        (q, q_labels, None, None, [0, 170, 400], None, (1, 2, 4, 8, 32, 100), 64),
        (q, q_labels, None, None, [0, 0, 400], None, (1, 5, 50), 7),  # process 0 holds nothing
        (q[:150], names[0], r, names[1], [0, 90, 150], [0, 240, 240], (1, 10, 100), 33),
    ]


def _worker(rank: int, world: int, port: int, cases, results) -> None:
    import torch.distributed as dist

    from vembed.evaluation.sharded_retrieval import sharded_retrieval_metrics

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out = []
    for q, q_labels, r, r_labels, q_cuts, r_cuts, ks, chunk in cases:
        mine = slice(q_cuts[rank], q_cuts[rank + 1])
        gallery = {}
        if r is not None:
            theirs = slice(r_cuts[rank], r_cuts[rank + 1])
            gallery = {"reference_embeddings": r[theirs], "reference_labels": r_labels[theirs]}
        out.append(sharded_retrieval_metrics(q[mine], q_labels[mine], **gallery, ks=ks, chunk_size=chunk))
    results.put((rank, out))
    dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_metrics_of_one():
    cases = _cases()
    context = mp.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    workers = [context.Process(target=_worker, args=(rank, 2, port, cases, results)) for rank in range(2)]
    for w in workers:
        w.start()
    by_rank = dict(results.get(timeout=240) for _ in workers)
    for w in workers:
        w.join(timeout=60)
        assert w.exitcode == 0
    for i, (q, q_labels, r, r_labels, _, _, ks, chunk) in enumerate(cases):
        gallery = {} if r is None else {"reference_embeddings": r, "reference_labels": r_labels}
        expected = retrieval_metrics(q, q_labels, **gallery, ks=ks, chunk_size=chunk)
        assert 0 < expected["recall@1"] < expected[f"recall@{ks[-1]}"]
        assert by_rank[0][i] == expected, f"case {i}"
        assert by_rank[1][i] == expected, f"case {i}"
    assert cases[0][0].shape[0] - by_rank[0][0]["num_queries"] == by_rank[0][0]["num_skipped"] == 1


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    return {
        "model": save_tiny_model(root / "model"),
        "records": make_image_dataset(root / "data", num_classes=3, per_class=5),
    }


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")
def test_eval_retrieval_under_torchrun_reports_what_one_process_does(data, tmp_path):
    args = ["eval", "retrieval", "--data", data["records"], "--model", data["model"], "--k", "1,2,5"]
    args = [str(a) for a in args] + ["data.num_workers=0"]
    one = runner.invoke(app, [*args, "--json", str(tmp_path / "one.json")])
    assert one.exit_code == 0, one.stderr
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "vembed"]
        + [*args, "--json", str(tmp_path / "two.json")],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on 2 processes" in done.stderr
    assert done.stdout.count("retrieval on") == 1  # one table, from process 0
    metrics = [json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two")]
    for key in ("recall@1", "recall@2", "recall@5", "map@r", "num_queries", "num_skipped"):
        assert metrics[0][key] == metrics[1][key], key
    assert metrics[1]["num_queries"] == 15


def test_index_is_refused_under_several_processes(data, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(
        "vembed.processes.launched_processes", lambda: contextlib.nullcontext(Processes(0, 2))
    )
    args = ["eval", "retrieval", "--data", data["records"], "--model", data["model"], "--index", "flat"]
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2
    assert "--index ranks in one process" in result.stderr
