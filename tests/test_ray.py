"""Ray Data in local mode (``ray.init(num_cpus=2)``) embeds exactly as ``vembed embed`` does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image_dataset, save_tiny_model
from typer.testing import CliRunner

from vembed.cli import app

ray = pytest.importorskip("ray", reason="the Ray tests need vembed[ray] (pip install 'vembed[ray]')")
pytest.importorskip("ray.data", reason="the Ray tests need ray[data] (pip install 'vembed[ray]')")
pq = pytest.importorskip("pyarrow.parquet")

runner = CliRunner()
F32 = "model.dtype=float32"


def cli(*args, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, f"exit {result.exit_code}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    model = save_tiny_model(root / "model")
    make_image_dataset(root / "data", num_classes=3, per_class=4)
    lines = cli("embed", root / "data" / "records.jsonl", "--model", model, "--jsonl", "-q", F32).stdout
    rows = [json.loads(line) for line in lines.splitlines()]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield {"root": root, "model": model, "rows": rows}
    ray.shutdown()


def unit(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def assert_same_embeddings(setup, paths, embeddings):
    want = {str(Path(r["path"]).resolve()): r["embedding"] for r in setup["rows"]}
    assert sorted(str(Path(p).resolve()) for p in paths) == sorted(want)
    for path, emb in zip(paths, embeddings, strict=True):
        assert float(unit(emb) @ unit(want[str(Path(path).resolve())])) >= 0.9999


def test_embed_engine_ray_parquet_equals_vembed_embed(setup, tmp_path):
    out = tmp_path / "emb.parquet"
    cli("embed", setup["root"] / "data" / "records.jsonl", "--model", setup["model"], "--engine", "ray",
        "--out", out, "--batch-size", 5, F32)  # fmt: skip
    table = pq.read_table(out)
    assert table.num_rows == 12 and table.schema.field("embedding").type.list_size == 32
    assert table.schema.field("label").type == "int64"
    paths = table["path"].to_pylist()
    assert paths == [r["path"] for r in setup["rows"]]  # listing order kept
    assert table["label"].to_pylist() == [i // 4 for i in range(12)]
    vectors = table["embedding"].combine_chunks().flatten().to_numpy().reshape(-1, 32)
    assert_same_embeddings(setup, paths, vectors)


def test_embed_engine_ray_lance_table(setup, tmp_path):
    lancedb = pytest.importorskip("lancedb", reason="needs vembed[lancedb]")
    cli("embed", setup["root"] / "data" / "images", "--model", setup["model"], "--engine", "ray",
        "--out", tmp_path / "db" / "photos.lance", F32)  # fmt: skip
    table = lancedb.connect(str(tmp_path / "db")).open_table("photos").to_arrow()
    assert table["label"].to_pylist()[:4] == ["class_0"] * 4
    vectors = table["embedding"].combine_chunks().flatten().to_numpy().reshape(-1, 32)
    assert_same_embeddings(setup, table["path"].to_pylist(), vectors)


def test_vembed_embedder_in_your_own_pipeline(setup):
    """The callable class in ``map_batches`` on a listing with a ``path`` column (decode + embed)."""
    from vembed.integrations.ray import VembedEmbedder

    paths = [r["path"] for r in setup["rows"]]
    ds = ray.data.from_items([{"path": p, "n": i} for i, p in enumerate(paths)])
    ds = ds.map_batches(VembedEmbedder, fn_constructor_kwargs={"model": str(setup["model"]), "dtype": "float32"},
                        concurrency=1, batch_size=4)  # fmt: skip
    rows = sorted(ds.take_all(), key=lambda r: r["n"])
    assert_same_embeddings(setup, [r["path"] for r in rows], np.stack([r["embedding"] for r in rows]))


def test_ray_refuses_a_store_output_and_names_a_bad_image(setup, tmp_path):
    result = cli("embed", setup["root"] / "data" / "images", "--model", setup["model"], "--engine", "ray",
                 "--out", tmp_path / "store", code=2)  # fmt: skip
    assert "DIR.parquet" in result.stderr
    bad = tmp_path / "bad.jsonl"
    (tmp_path / "broken.png").write_bytes(b"not a png")
    bad.write_text(json.dumps({"image": "broken.png", "label": 0}) + "\n")
    result = cli("embed", bad, "--model", setup["model"], "--engine", "ray", "--out", tmp_path / "x.parquet",
                 F32, code=2)  # fmt: skip
    assert "cannot decode image" in result.stderr and "broken.png" in result.stderr
    assert not (tmp_path / "x.parquet").exists()
