"""The embedding store, exact and faiss search, query sources and the results grid (library level)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import class_image, make_image_dataset, save_tiny_model
from PIL import Image

from vembed.data.records import ImageRecord, records_from_folder
from vembed.errors import VembedError
from vembed.index.embed import check_finite, embed_to_store, embedding_line
from vembed.index.faiss_index import INDEX_FILE, build_index, load_index, save_index
from vembed.index.grid import BORDER, GAP, MATCH, MISMATCH, QUERY, SEPARATOR, UNKNOWN, draw_grid
from vembed.index.search import Hit, Query, QueryResult, search, search_queries
from vembed.index.sources import queries_from_args, records_from_source
from vembed.index.store import (
    EmbeddingStore,
    embedder_for_store,
    is_store,
    open_store,
    write_store,
)
from vembed.inference import EmbedOptions
from vembed.models.factory import create_embedder
from vembed.neighbours import topk
from vembed.settings import IndexSettings, Settings, load_settings

QUIET = EmbedOptions(num_workers=0, show_progress=False)


def clustered(n: int, dim: int = 16, clusters: int = 20, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=gen)
    x = centres[torch.randint(0, clusters, (n,), generator=gen)] + 0.3 * torch.randn(n, dim, generator=gen)
    return torch.nn.functional.normalize(x, dim=1)


def vector_store(embeddings: torch.Tensor, path: Path | None = None) -> EmbeddingStore:
    """A store of plain vectors (no model), written to ``path`` when given."""
    manifest = [{"path": f"/img/{i}.png", "label": i % 3, "category": None} for i in range(len(embeddings))]
    meta = {
        "format": "vembed-store",
        "format_version": 1,
        "count": len(embeddings),
        "dim": embeddings.shape[1],
    }
    store = EmbeddingStore(None, embeddings, manifest, meta)
    if path is not None:
        write_store(store, path)
        return open_store(path)
    return store


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """A tiny model, 3 classes × 4 images, and the store of them."""
    root = tmp_path_factory.mktemp("embedded")
    model = save_tiny_model(root / "model")
    make_image_dataset(root / "data", num_classes=3, per_class=4)
    embedder = create_embedder(str(model))
    records = records_from_folder(root / "data" / "images").images()
    store, summary = embed_to_store(embedder, records, root / "store", model=str(model), options=QUIET)
    return {"root": root, "model": model, "embedder": embedder, "records": records, "store": store}


# ------------------------------------------------------------------------------------------- store


def test_store_round_trip_keeps_rows_labels_and_model(embedded):
    store = open_store(embedded["root"] / "store")
    assert len(store) == 12 and store.dim == 32
    assert torch.allclose(store.embeddings.norm(dim=1), torch.ones(12), atol=1e-5)
    assert store.paths == [str(r.image.resolve()) for r in embedded["records"]]
    assert store.labels == [r.label for r in embedded["records"]]
    meta = store.meta
    assert meta["model"]["source"] == str(embedded["model"].resolve())  # a local folder: absolute
    assert meta["model"]["pooling"] == "cls" and meta["normalize"] is True
    assert meta["preprocessing"]["image_size"] == 28 and meta["count"] == 12 and meta["dim"] == 32
    assert meta["vembed_version"] and meta["created"]


def test_store_model_is_rebuilt_from_meta_and_embeds_identically(embedded):
    store = open_store(embedded["root"] / "store")
    embedder = embedder_for_store(store)
    report = search_queries(
        store, [Query("q", embedded["records"][5].image)], load_settings(values={"data.num_workers": 0}), k=3
    )
    (result,) = report.results
    assert result.hits[0].index == 5 and result.hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert embedder.pooling == "cls" and embedder.embed_dim == 32


def test_store_detects_a_model_changed_since(tmp_path, embedded):
    model = save_tiny_model(tmp_path / "model", seed=0)
    embedder = create_embedder(str(model))
    store, _ = embed_to_store(
        embedder,
        embedded["records"][:3],
        tmp_path / "store",
        model=str(model),
        options=QUIET,
    )
    save_tiny_model(tmp_path / "model", seed=1)  # "retrained in place"
    with pytest.raises(VembedError, match="no longer embeds"):
        embedder_for_store(open_store(tmp_path / "store"))


def test_write_store_replaces_a_store_but_never_another_folder(tmp_path):
    write_store(vector_store(clustered(5)), tmp_path / "s")
    write_store(vector_store(clustered(7)), tmp_path / "s")
    assert len(open_store(tmp_path / "s")) == 7
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "keep.jpg").write_bytes(b"x")
    with pytest.raises(VembedError, match="not a vembed store; refusing"):
        write_store(vector_store(clustered(5)), tmp_path / "photos")
    assert (tmp_path / "photos" / "keep.jpg").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos", "s"]  # no temp folders left


def test_open_store_errors_name_the_file(tmp_path):
    with pytest.raises(VembedError, match="store not found"):
        open_store(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    with pytest.raises(VembedError, match="not a vembed store"):
        open_store(tmp_path / "plain")
    path = tmp_path / "s"
    write_store(vector_store(clustered(4)), path)
    (path / "manifest.jsonl").write_text('{"path": "/a.png"}\n{"path": "/b.png"}\n')
    with pytest.raises(VembedError, match=r"manifest.jsonl: 2 rows but embeddings.safetensors holds 4"):
        open_store(path)
    (path / "manifest.jsonl").write_text('{"path": "/a.png"}\n{"path": \n')
    with pytest.raises(VembedError, match=r"manifest.jsonl:2: malformed JSON"):
        open_store(path)
    (path / "meta.json").write_text("{oops")
    with pytest.raises(VembedError, match=r"meta.json: invalid JSON"):
        open_store(path)
    assert not is_store(path)


def test_embed_to_store_writes_nothing_when_an_image_is_bad(tmp_path, embedded):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    records = [*embedded["records"][:2], ImageRecord(bad, None, None, str(bad))]
    with pytest.raises(VembedError, match="bad.png"):
        embed_to_store(embedded["embedder"], records, tmp_path / "store", model="m", options=QUIET)
    assert not (tmp_path / "store").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.png"]
    store, summary = embed_to_store(
        embedded["embedder"],
        records,
        tmp_path / "store",
        model="m",
        options=EmbedOptions(num_workers=0, skip_bad=True, show_progress=False),
    )
    assert len(store) == 2 and len(summary.problems) == 1 and store.meta["num_skipped"] == 1


def test_non_finite_embeddings_are_an_error_naming_the_image():
    records = [ImageRecord(Path("a.jpg")), ImageRecord(Path("b.jpg"))]
    check_finite(torch.ones(2, 3), records)
    with pytest.raises(
        VembedError, match=r"b.jpg: the model produced NaN/infinite values .* model.dtype=float32"
    ):
        check_finite(torch.tensor([[1.0, 0.0], [float("nan"), 1.0]]), records)


# ------------------------------------------------------------------------------------------ search


def test_exact_search_is_retrieval_topk():
    data = clustered(300)
    store = vector_store(data)
    scores, indices, method = search(store, data[:20], 5, IndexSettings(kind="exact"))
    ref_scores, ref_indices = topk(data[:20], data, 5)
    assert method == "exact"
    assert torch.equal(indices, ref_indices) and torch.allclose(scores, ref_scores)
    assert torch.equal(indices[:, 0], torch.arange(20))


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_faiss_indexes_agree_with_exact_search(tmp_path, kind):
    data = clustered(2000)
    store = vector_store(data, tmp_path / "s")
    settings = IndexSettings(kind=kind, nprobe=8)
    scores, indices, method = search(store, data[:200], 10, settings)
    _, exact = topk(data[:200], data, 10)
    assert method == kind
    overlap = (
        sum(len(set(a) & set(b)) for a, b in zip(indices.tolist(), exact.tolist(), strict=True))
        / exact.numel()
    )
    assert overlap >= (0.999 if kind == "flat" else 0.9), overlap
    assert (indices[:, 0] == torch.arange(200)).float().mean() >= 0.95  # every item finds itself
    assert torch.allclose(scores, (data[:200, None] * data[indices.clamp(min=0)]).sum(-1), atol=1e-4)
    assert load_index(tmp_path / "s", count=2000, dim=16).kind == kind  # built on demand, saved


def test_auto_uses_exact_below_threshold_then_hnsw_and_then_the_saved_index(tmp_path):
    data = clustered(500)
    store = vector_store(data, tmp_path / "s")
    assert search(store, data[:3], 3, IndexSettings())[2] == "exact"
    assert not (tmp_path / "s" / INDEX_FILE).exists()
    assert search(store, data[:3], 3, IndexSettings(faiss_threshold=100))[2] == "hnsw"
    assert (tmp_path / "s" / INDEX_FILE).exists()
    save_index(build_index(data, "ivf", show_progress=False), tmp_path / "s")
    assert search(store, data[:3], 3, IndexSettings())[2] == "ivf"  # a saved index wins under auto
    assert search(store, data[:3], 3, IndexSettings(kind="exact"))[2] == "exact"


def test_a_stale_index_is_an_error_that_says_how_to_fix_it(tmp_path):
    store = vector_store(clustered(50), tmp_path / "s")
    save_index(build_index(clustered(40), "flat", show_progress=False), tmp_path / "s")
    with pytest.raises(VembedError, match=r"holds 40 vectors .*`vembed index build "):
        search(store, clustered(2), 3, IndexSettings())
    (tmp_path / "s" / INDEX_FILE).write_bytes(b"garbage")
    with pytest.raises(VembedError, match="cannot read the faiss index"):
        search(store, clustered(2), 3, IndexSettings())


def test_k_larger_than_the_store_and_wrong_dims():
    store = vector_store(clustered(4))
    scores, indices, _ = search(store, clustered(2), 10)
    assert indices.shape == (2, 4)
    with pytest.raises(VembedError, match="store holds 16-d"):
        search(store, torch.randn(2, 8), 3)


def test_exclude_self_and_query_labels_from_the_store(embedded):
    store = embedded["store"]
    image = embedded["records"][0].image
    settings = load_settings(values={"data.num_workers": 0})
    (result,) = search_queries(store, [Query("q", image)], settings, k=3, exclude_self=True).results
    assert len(result.hits) == 3 and all(h.path != str(image.resolve()) for h in result.hits)
    assert [h.rank for h in result.hits] == [1, 2, 3]
    assert result.query.label == embedded["records"][0].label  # found in the store's manifest


def test_precomputed_query_embeddings_need_no_model(embedded):
    store = embedded["store"]
    rows = [
        json.loads(embedding_line(ImageRecord(Path(p)), e))
        for p, e in zip(store.paths, store.embeddings, strict=True)
    ]
    stdin = io.StringIO("".join(json.dumps(r) + "\n" for r in rows[:4]))
    queries, problems = queries_from_args(["-"], stdin=stdin)
    assert not problems and all(q.embedding is not None for q in queries)
    report = search_queries(store, queries, Settings(), k=1)
    assert [r.hits[0].index for r in report.results] == [0, 1, 2, 3]
    assert all(r.hits[0].score == pytest.approx(1.0, abs=1e-6) for r in report.results)
    short = io.StringIO(json.dumps({"path": "x", "embedding": [0.1, 0.2]}) + "\n")
    with pytest.raises(VembedError, match="has 2 values; the store holds 32-d"):
        search_queries(store, queries_from_args(["-"], stdin=short)[0], Settings())


# ----------------------------------------------------------------------------------------- sources


def test_sources_folder_jsonl_image_and_stdin(tmp_path):
    records_file = make_image_dataset(tmp_path / "d", num_classes=2, per_class=2)
    folder = tmp_path / "d" / "images"
    from_folder, _ = records_from_source(folder)
    assert [r.label for r in from_folder] == ["class_0", "class_0", "class_1", "class_1"]
    from_jsonl, _ = records_from_source(records_file)
    assert [r.label for r in from_jsonl] == [0, 0, 1, 1]
    one, _ = records_from_source(folder / "class_0" / "img_0.png")
    assert len(one) == 1
    stdin = io.StringIO(f"{folder / 'class_1' / 'img_1.png'}\n\n{folder / 'class_0' / 'img_0.png'}\n")
    from_stdin, _ = records_from_source("-", stdin=stdin)
    assert [r.image.name for r in from_stdin] == ["img_1.png", "img_0.png"]
    with pytest.raises(VembedError, match=r"<stdin>:2: image not found: missing.png"):
        records_from_source("-", stdin=io.StringIO(f"{folder / 'class_0' / 'img_0.png'}\nmissing.png\n"))
    kept, problems = records_from_source(
        "-", stdin=io.StringIO(f"{folder / 'class_0' / 'img_0.png'}\nmissing.png\n"), skip_bad=True
    )
    assert len(kept) == 1 and problems == ["<stdin>:2: image not found: missing.png"]
    with pytest.raises(VembedError, match="source not found"):
        records_from_source(tmp_path / "nothing")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(VembedError, match="not a folder, a records file"):
        records_from_source(tmp_path / "notes.txt")


def test_query_lines_on_stdin(tmp_path):
    image = tmp_path / "a.png"
    class_image(0, 0).save(image)
    stdin = io.StringIO(f'{image}\n{{"image": "{image}", "label": 3}}\n')
    queries, _ = queries_from_args(["-"], stdin=stdin)
    assert [(q.path, q.label) for q in queries] == [(image, None), (image, 3)]
    with pytest.raises(VembedError, match=r"<stdin>:1: malformed JSON"):
        queries_from_args(["-"], stdin=io.StringIO('{"path": \n'))
    with pytest.raises(VembedError, match=r"<stdin>:1: 'embedding' must be a non-empty list of numbers"):
        queries_from_args(["-"], stdin=io.StringIO('{"embedding": ["a"]}\n'))
    with pytest.raises(VembedError, match="query image not found: nope.png"):
        queries_from_args(["nope.png"])


# -------------------------------------------------------------------------------------------- grid


def test_grid_borders_show_whether_labels_match(tmp_path):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        class_image(i, 0, size=50).save(paths[-1])
    hits = [
        Hit(1, 0, str(paths[0]), "cat", 0.9),
        Hit(2, 1, str(paths[1]), "dog", 0.8),
        Hit(3, 2, str(paths[2]), None, 0.7),
        Hit(4, 3, str(tmp_path / "gone.png"), "cat", 0.6),
    ]
    results = [
        QueryResult(Query("q", paths[0], "cat"), hits),
        QueryResult(Query("q2", paths[1], None), hits[:2]),
    ]
    thumb = 40
    out = draw_grid(results, tmp_path / "grid.png", thumb=thumb)
    grid = Image.open(out).convert("RGB")
    cell = thumb + 2 * BORDER
    assert grid.width == GAP + cell + SEPARATOR + 4 * (cell + GAP)

    def border(row: int, col: int) -> tuple:  # top-left border pixel of a cell
        y = GAP + row * (grid.height - GAP) // 2
        x = GAP if col == 0 else GAP + cell + SEPARATOR + (col - 1) * (cell + GAP)
        return grid.getpixel((x + 1, y + 1))

    assert border(0, 0) == QUERY
    assert [border(0, c) for c in (1, 2, 3, 4)] == [MATCH, MISMATCH, UNKNOWN, MATCH]
    assert [border(1, c) for c in (1, 2)] == [UNKNOWN, UNKNOWN]  # query label unknown
    # the thumbnail is drawn inside the border (not the empty cell background)
    inside = grid.crop(
        (
            GAP + cell + SEPARATOR + BORDER,
            GAP + BORDER,
            GAP + cell + SEPARATOR + BORDER + thumb,
            GAP + BORDER + thumb,
        )
    )
    assert len(set(inside.getdata())) > 10
    with pytest.raises(VembedError, match="no search results"):
        draw_grid([], tmp_path / "empty.png")
    assert sorted(os.listdir(tmp_path)) == ["0.png", "1.png", "2.png", "grid.png"]
