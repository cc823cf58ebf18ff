"""Indexes for large stores: IVF-PQ (and OPQ) recall, built shard by shard, memory-mapped, measured."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vembed.cli import app
from vembed.errors import VembedError
from vembed.index.faiss_index import build_index, build_store_index, load_index, measure_index, save_index
from vembed.index.search import search
from vembed.index.store import open_store
from vembed.index.vectors import StoreVectors, exact_topk, write_vector_store
from vembed.neighbours import topk
from vembed.settings import IndexSettings

runner = CliRunner()


def clustered(n: int, dim: int = 32, clusters: int = 100, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + 0.4 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module", autouse=True)
def one_faiss_thread():
    """faiss's OpenMP threads spin against torch's on a busy 2-core box (10x slower k-means)."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """20 000 clustered 32-d vectors in a store of 5 shards."""
    x = clustered(20_000)
    path = write_vector_store(tmp_path_factory.mktemp("scale") / "store", np.array_split(x, 5))
    return path, x


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, exact, strict=True)]))


def test_a_sharded_store_reads_as_its_shards_concatenated(sharded):
    path, x = sharded
    store = open_store(path)
    assert len(store) == 20_000 and torch.equal(store.embeddings, torch.from_numpy(x))
    vectors = StoreVectors(path)
    rows = np.array([[0, 3999, 4000], [19_999, 12_345, 7]])
    assert np.array_equal(vectors[rows], x[rows])
    scores, indices = exact_topk(path, x[:50], 10, chunk_size=16)
    want_scores, want_indices = topk(torch.from_numpy(x[:50]), torch.from_numpy(x), 10)
    assert torch.equal(indices, want_indices) and torch.allclose(scores, want_scores)


def test_ivfpq_recall_at_10_on_clustered_data(sharded):
    path, x = sharded
    settings = IndexSettings(nlist=64, nprobe=16, pq_m=16, pq_nbits=6, rerank=0)
    index = build_store_index(path, "ivfpq", settings, show_progress=False)
    assert index.info["factory"] == "IVF64,PQ16x6" and index.info["train_size"] == 64 * 64
    _, exact = topk(torch.from_numpy(x[:300]), torch.from_numpy(x), 10)
    _, raw = index.search(x[:300], 10, settings)
    rescored = settings.model_copy(update={"rerank": 8})
    _, reranked = index.search(x[:300], 10, rescored, vectors=StoreVectors(path))
    assert recall(raw, exact.numpy()) >= 0.4  # 12 bytes per vector instead of 128 (0.52 measured)
    assert recall(reranked, exact.numpy()) >= 0.95  # 80 PQ candidates re-scored exactly (0.98 measured)


def test_built_shard_by_shard_equals_built_in_memory(sharded):
    path, x = sharded
    settings = IndexSettings(nlist=32)
    from_store = build_store_index(path, "ivf", settings, show_progress=False)
    in_memory = build_index(x, "ivf", settings, show_progress=False)
    a, b = from_store.search(x[:100], 10, settings), in_memory.search(x[:100], 10, settings)
    assert np.array_equal(a[1], b[1])


def test_a_memory_mapped_index_searches_like_the_loaded_one(sharded, tmp_path):
    path, x = sharded
    settings = IndexSettings(nlist=32, pq_m=16, pq_nbits=6, rerank=8)
    save_index(build_store_index(path, "ivfpq", settings, show_progress=False), path)
    loaded = load_index(path, count=20_000, dim=32)
    mapped = load_index(path, count=20_000, dim=32, mmap=True)
    assert np.array_equal(loaded.search(x[:20], 5, settings)[1], mapped.search(x[:20], 5, settings)[1])
    store = open_store(path)
    _, indices, method = search(
        store, torch.from_numpy(x[:20]), 5, settings.model_copy(update={"kind": "ivfpq"})
    )
    assert method == "ivfpq" and sum(indices[:, 0] == torch.arange(20)) >= 18  # re-scored: itself first
    measured = measure_index(path, mapped, settings, sample=200)
    assert 0.9 <= measured["recall@10"] <= 1.0 and measured["qps"] > 0 and measured["queries"] == 200


def test_pq_m_must_divide_the_dim(sharded):
    with pytest.raises(VembedError, match=r"index.pq_m=7 must divide the embedding dim 32"):
        build_store_index(sharded[0], "ivfpq", IndexSettings(nlist=8, pq_m=7), show_progress=False)


def test_index_build_and_info_commands(tmp_path):
    path = write_vector_store(tmp_path / "store", np.array_split(clustered(3000, dim=16, clusters=30), 3))
    built = runner.invoke(app, ["index", "build", str(path), "--kind", "ivfpq", "--nlist", "8", "--m", "8",
                                "--nbits", "4", "--opq"])  # fmt: skip
    assert built.exit_code == 0, built.stderr
    assert "built the ivfpq index over 3000 vectors" in built.stderr.replace("\n", "")
    info = runner.invoke(
        app, ["index", "info", str(path), "--sample", "100", "index.nprobe=8", "index.rerank=10"]
    )
    assert info.exit_code == 0, info.stderr
    out = info.stdout.replace("\n", "")
    assert "OPQ8,IVF8,PQ8x4" in out and "queries per second" in out and "bytes per vector" in out
    recall_at_10 = float(out.split("recall@10 vs exact")[1].split()[1])
    assert recall_at_10 >= 0.9  # every cluster visited, 100 candidates re-scored


def test_eval_metrics_from_an_index_report_the_loss_against_exact():
    from vembed.evaluation.ann_retrieval import ann_retrieval_metrics
    from vembed.evaluation.retrieval import retrieval_metrics

    x = clustered(3000, dim=16, clusters=30)
    labels = np.argmax(x @ clustered(30, dim=16, clusters=30, seed=1).T, axis=1)  # 30 regions of the sphere
    exact = retrieval_metrics(x, labels, ks=(1, 10))
    same = ann_retrieval_metrics(x, labels, kind="flat", ks=(1, 10), sample=300)
    assert same["recall@1"] == pytest.approx(exact["recall@1"]) and same["recall@10"] == exact["recall@10"]
    assert same["recall_loss@1"] == 0 and same["neighbour_recall@10"] == 1.0 and "map@r" not in same
    coarse = ann_retrieval_metrics(
        x, labels, kind="ivfpq", settings=IndexSettings(nlist=16, nprobe=1, pq_m=4, pq_nbits=4, rerank=0),
        ks=(1, 10), sample=300,
    )  # fmt: skip
    assert coarse["neighbour_recall@10"] < 0.9 and coarse["recall_loss@1"] >= 0
    assert coarse["num_queries"] == exact["num_queries"]


def test_eval_retrieval_with_an_index(tiny_model, image_dataset, tmp_path):
    out = tmp_path / "m.json"
    args = ["eval", "retrieval", "--model", str(tiny_model), "--data", str(image_dataset), "--k", "1,3"]
    result = runner.invoke(app, [*args, "--index", "hnsw", "--json", str(out), "data.num_workers=0"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    assert {"recall@1", "recall@3", "recall_loss@1", "neighbour_recall@10"} <= set(metrics)
    assert metrics["neighbour_recall@10"] == 1.0 and metrics["num_queries"] == 20  # HNSW is exact on 20
    bad = runner.invoke(app, [*args, "--index", "lsh"])
    assert bad.exit_code == 2 and "--index lsh: choose one of flat, hnsw, ivf, ivfpq" in bad.stderr
