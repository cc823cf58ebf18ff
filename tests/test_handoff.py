"""``vembed store export``: Parquet, LanceDB and Qdrant (local modes) round-trip the store's rows and
answer top-10 queries as vembed's exact search does."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from vembed.cli import app
from vembed.errors import VembedError
from vembed.extras import require
from vembed.handoff.check import check_export
from vembed.index.store import open_store
from vembed.index.vectors import exact_topk, write_vector_store

runner = CliRunner()
DIM = 16


def unit_rows(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """400 unit vectors in 3 shards (150 + 150 + 100), integer labels."""
    chunks = [unit_rows(150, 1), unit_rows(150, 2), unit_rows(100, 3)]
    return write_vector_store(
        tmp_path_factory.mktemp("h") / "store", chunks, labels=[i % 7 for i in range(400)]
    )


def exact_ids(store, queries, k=10) -> list[list[int]]:
    return exact_topk(store, queries, k)[1].tolist()


def test_require_names_the_pip_install():
    with pytest.raises(VembedError, match=r"pip install 'vembed\[serve\]'"):
        require("no_such_module_for_vembed", "serve", what="vembed serve")


def test_the_check_catches_a_database_that_answers_wrong(store):
    def wrong(queries, k):
        return [[(i, 0.0) for i in range(k)] for _ in queries]

    def right(queries, k):
        scores, ids = exact_topk(store, queries, k)
        return [list(zip(i, s, strict=True)) for i, s in zip(ids.tolist(), scores.tolist(), strict=True)]

    bad = check_export(store, wrong, sample=10)
    assert not bad.same_top_k and bad.recall < 0.5
    good = check_export(store, right, sample=10)
    assert good.same_top_k and good.recall == 1.0 and good.max_score_error < 1e-5


def test_parquet_one_file_per_shard_same_rows_and_meta(store, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="needs pyarrow: pip install 'vembed[parquet]'")
    import pyarrow as pa
    import pyarrow.dataset as ds

    from vembed.handoff.parquet import export_parquet, read_parquet_meta

    out = tmp_path / "pq"
    report = export_parquet(store, out, show_progress=False)
    files = sorted(out.glob("part-*.parquet"))
    assert report.rows == 400 and report.files == 3 and len(files) == 3
    assert [pq.read_metadata(f).num_rows for f in files] == [150, 150, 100]
    table = pa.concat_tables(pq.read_table(f) for f in files)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), DIM)
    assert table.schema.field("label").type == pa.int64()
    original = open_store(store)
    assert table["id"].to_pylist() == list(range(400))
    assert table["path"].to_pylist() == original.paths and table["label"].to_pylist() == original.labels
    vectors = table["embedding"].combine_chunks().flatten().to_numpy().reshape(-1, DIM)
    assert np.array_equal(vectors, original.embeddings.numpy())
    assert read_parquet_meta(files[0])["count"] == 400
    # the folder is one data set to Arrow (docs/scale.md): the manifest is not taken for a Parquet file
    assert ds.dataset(out).to_table().num_rows == 400
    export_parquet(store, out, show_progress=False)  # a previous export is replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(VembedError, match="not a vembed Parquet export"):
        export_parquet(store, tmp_path / "mine", show_progress=False)


def test_parquet_text_labels(tmp_path):
    pytest.importorskip("pyarrow.parquet", reason="needs pyarrow")
    import pyarrow.parquet as pq

    from vembed.handoff.parquet import export_parquet

    store = write_vector_store(tmp_path / "s", [unit_rows(5, 0)], labels=["a", 3, None, "b", "a"])
    export_parquet(store, tmp_path / "pq", show_progress=False)
    labels = pq.read_table(tmp_path / "pq" / "part-00000.parquet")["label"].to_pylist()
    assert labels == ["a", "3", None, "b", "a"]


def test_lancedb_flat_export_round_trips_and_ranks_like_exact_search(store, tmp_path):
    lancedb = pytest.importorskip("lancedb", reason="needs lancedb: pip install 'vembed[lancedb]'")
    from vembed.handoff.lancedb import export_lancedb

    report = export_lancedb(store, str(tmp_path / "db"), table="photos", show_progress=False)
    assert report.rows == 400 and report.details["index"] is None
    assert report.details["self_check"]["same_top_k"] is True
    table = lancedb.connect(str(tmp_path / "db")).open_table("photos")
    arrow = table.to_arrow().sort_by("id")
    original = open_store(store)
    assert arrow["path"].to_pylist() == original.paths
    vectors = arrow["embedding"].combine_chunks().flatten().to_numpy().reshape(-1, DIM)
    assert np.array_equal(vectors, original.embeddings.numpy())
    queries = original.embeddings[[3, 170, 399]].numpy()
    for q, want in zip(queries, exact_ids(store, queries), strict=True):
        rows = table.search(q, vector_column_name="embedding").distance_type("cosine").limit(10).to_list()
        assert [r["id"] for r in rows] == want


def test_lancedb_builds_ivf_pq_past_the_threshold_and_states_recall(store, tmp_path):
    lancedb = pytest.importorskip("lancedb", reason="needs lancedb")
    from vembed.handoff.lancedb import export_lancedb

    report = export_lancedb(store, str(tmp_path / "db"), index_min_rows=300, show_progress=False)
    assert report.details["index"]["kind"] == "IVF_PQ"
    assert lancedb.connect(str(tmp_path / "db")).open_table("store").list_indices()
    check = report.details["self_check"]
    assert 0.0 < check["recall"] <= 1.0 and check["queries"] == 20
    assert ("the same top-10" in report.check) == check["same_top_k"]


def test_qdrant_local_export_round_trips_and_ranks_like_exact_search(store, tmp_path):
    pytest.importorskip("qdrant_client", reason="needs qdrant-client: pip install 'vembed[qdrant]'")
    from vembed.handoff.qdrant import export_qdrant, qdrant_client

    client = qdrant_client(str(tmp_path / "qdrant"))
    report = export_qdrant(store, str(tmp_path / "qdrant"), collection="photos", batch_size=64,
                           show_progress=False, client=client)  # fmt: skip
    assert report.rows == 400 and report.details["self_check"]["same_top_k"] is True
    original = open_store(store)
    points, _ = client.scroll("photos", limit=500, with_payload=True, with_vectors=True)
    points.sort(key=lambda p: p.id)
    assert [p.payload["path"] for p in points] == original.paths
    assert [p.payload["label"] for p in points] == original.labels
    assert np.allclose(np.array([p.vector for p in points]), original.embeddings.numpy(), atol=1e-6)
    queries = original.embeddings[[0, 151, 333]].numpy()
    for q, want in zip(queries, exact_ids(store, queries), strict=True):
        hits = client.query_points("photos", query=q.tolist(), limit=10).points
        assert [h.id for h in hits] == want
    client.close()


def test_cli_store_export_parquet_and_a_wrong_kind(store, tmp_path):
    pytest.importorskip("pyarrow.parquet", reason="needs pyarrow")
    result = runner.invoke(
        app, ["store", "export", str(store), "--to", "parquet", str(tmp_path / "pq"), "-q"]
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["rows"] == 400 and report["files"] == 3 and "identical" in report["check"]
    result = runner.invoke(app, ["store", "export", str(store), "--to", "milvus", str(tmp_path / "m")])
    assert result.exit_code == 2 and "choose one of parquet, lancedb, qdrant" in result.stderr


@pytest.mark.parametrize(
    ("module", "args", "extra"),
    [
        ("uvicorn", ["serve", "{model}"], "serve"),
        ("lancedb", ["store", "export", "{store}", "--to", "lancedb", "{tmp}/db"], "lancedb"),
        ("qdrant_client", ["store", "export", "{store}", "--to", "qdrant", "{tmp}/q"], "qdrant"),
        ("pyarrow", ["store", "export", "{store}", "--to", "parquet", "{tmp}/pq"], "parquet"),
        (
            "ray",
            ["embed", "{tmp}", "--model", "{model}", "--engine", "ray", "--out", "{tmp}/e.parquet"],
            "ray",
        ),
    ],
)
def test_a_missing_extra_is_one_line_naming_its_pip_install(
    store, tmp_path, monkeypatch, module, args, extra
):
    from conftest import save_tiny_model

    model = save_tiny_model(tmp_path / "model") if "{model}" in args else None
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # import module -> ImportError
    argv = [a.format(model=model, store=store, tmp=tmp_path) for a in args]
    result = runner.invoke(app, argv)
    assert result.exit_code == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and f"pip install 'vembed[{extra}]'" in lines[-1], result.stderr
    assert "Traceback" not in result.stderr
