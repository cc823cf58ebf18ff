"""Corpus-mined hard negatives: the miner (vembed/mining.py), the records' `negatives` field, and the P x K
sampler putting an anchor's mined negatives into its batch (train.hard_negatives)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vembed.data.records import ImageRecord, parse_negatives, parse_record, read_records
from vembed.data.samplers import PKBatchSampler
from vembed.errors import VembedError
from vembed.inference import EmbedOptions
from vembed.mining import mine_file, mine_negatives, negative_indices

QUIET = EmbedOptions(num_workers=0, show_progress=False)


def _clusters(num_classes=6, per_class=4, dim=16, seed=0, spread=0.05):
    """Well separated classes: each class a random direction plus small noise (normalised)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=g), dim=1)
    labels = [c for c in range(num_classes) for _ in range(per_class)]
    emb = centres[labels] + spread * torch.randn(len(labels), dim, generator=g)
    return torch.nn.functional.normalize(emb, dim=1), labels


def _brute_force(emb, labels, k, margin, categories=None):
    """The definition, one anchor at a time in plain Python."""
    sims = (emb @ emb.T).tolist()
    out, dropped = [], 0
    for i, row in enumerate(sims):
        positives = [row[j] for j in range(len(row)) if j != i and labels[j] == labels[i]]
        threshold = max(positives) - margin if positives else math.inf
        candidates = []
        for j, s in enumerate(row):
            if labels[j] == labels[i] or (categories is not None and categories[j] != categories[i]):
                continue
            if s > threshold:
                dropped += 1
                continue
            candidates.append((-s, j))
        out.append([j for _, j in sorted(candidates)[:k]])
    return out, dropped


def test_negatives_are_the_nearest_images_of_other_labels():
    emb, labels = _clusters()
    mined = mine_negatives(emb, labels, k=5, margin=0.05, chunk_size=7)  # chunks of uneven size
    expected, dropped = _brute_force(emb, labels, 5, 0.05)
    assert mined.negatives == expected
    assert mined.dropped_by_guard == dropped
    for i, row in enumerate(mined.negatives):
        assert len(row) == 5 and all(labels[j] != labels[i] for j in row)
        assert mined.scores[i] == sorted(mined.scores[i], reverse=True)
        np.testing.assert_allclose(mined.scores[i], (emb[i] @ emb[row].T).numpy(), atol=1e-6)
    # separable data: every positive is nearer than every negative, so the guard drops nothing
    assert mined.dropped_by_guard == 0 and mined.summary()["mean_negatives"] == 5.0


def test_the_guard_drops_a_planted_near_duplicate_of_a_positive():
    emb, labels = _clusters(num_classes=4, per_class=3)
    # record 12: a near-copy of record 1 (class 0) filed under a new label 9
    duplicate = torch.nn.functional.normalize(emb[1] + 1e-3, dim=0)
    emb = torch.cat([emb, duplicate[None]])
    labels = [*labels, 9]
    unguarded = mine_negatives(emb, labels, k=3, margin=math.inf)
    assert 12 in unguarded.negatives[0] and unguarded.negatives[0][0] == 12  # the hardest "negative"
    guarded = mine_negatives(emb, labels, k=3, margin=0.05)
    assert 12 not in guarded.negatives[0] and 12 not in guarded.negatives[2]
    assert guarded.dropped_by_guard >= 3  # anchors 0, 1, 2 of class 0 each had it as a candidate
    assert guarded.without_positive == 1  # the duplicate's own label has no other image: no guard
    expected, dropped = _brute_force(emb, labels, 3, 0.05)
    assert guarded.negatives == expected and guarded.dropped_by_guard == dropped


def test_same_category_restricts_the_negatives():
    emb, labels = _clusters(num_classes=6, per_class=3)
    categories = ["a" if label < 3 else "b" for label in labels]
    mined = mine_negatives(emb, labels, k=20, categories=categories, same_category=True)
    for i, row in enumerate(mined.negatives):
        assert row and all(categories[j] == categories[i] for j in row)
        assert len(row) == 6  # the other 2 classes of the category x 3 images
    assert mined.negatives == _brute_force(emb, labels, 20, 0.05, categories)[0]
    with pytest.raises(VembedError, match="category"):
        mine_negatives(emb, labels, k=2, same_category=True)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_faiss_candidates_give_the_exact_negatives_on_a_small_set(kind):
    emb, labels = _clusters(num_classes=8, per_class=5, dim=12, spread=0.3)
    duplicate = torch.nn.functional.normalize(emb[1] + 1e-3, dim=0)  # a false negative for class 0
    emb, labels = torch.cat([emb, duplicate[None]]), [*labels, 99]
    categories = [label % 2 for label in labels]
    for same in (False, True):
        kw = dict(k=4, margin=0.05, categories=categories, same_category=same, chunk_size=16)
        exact = mine_negatives(emb, labels, **kw)
        approximate = mine_negatives(emb, labels, index=kind, **kw)
        assert approximate.negatives == exact.negatives
        np.testing.assert_allclose(sum(approximate.scores, []), sum(exact.scores, []), atol=1e-5)
        assert approximate.without_positive == exact.without_positive == 1
        assert 40 not in approximate.negatives[1]  # the guard held with faiss candidates too


@pytest.mark.parametrize(
    "kwargs, message",
    [({"k": 0}, "k must be a positive integer"), ({"margin": -1.0}, "margin"), ({"k": 1.5}, "k must be")],
)
def test_bad_arguments_are_one_error(kwargs, message):
    emb, labels = _clusters(2, 2)
    with pytest.raises(VembedError, match=message):
        mine_negatives(emb, labels, **kwargs)


# -- the records file ---------------------------------------------------------------------------------


def _write_records(root: Path, num_classes=4, per_class=3, categories=False) -> Path:
    from conftest import class_image

    lines = []
    for label in range(num_classes):
        for i in range(per_class):
            path = root / f"c{label}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            class_image(label, i, 28).save(path)
            row = {"image": f"c{label}/{i}.png", "label": f"class-{label}", "extra": {"keep": [label, i]}}
            if categories:
                row["category"] = "warm" if label % 2 else "cold"
            lines.append(json.dumps(row))
    (root / "train.jsonl").write_text("\n".join(lines[:5]) + "\n\n" + "\n".join(lines[5:]) + "\n")
    return root / "train.jsonl"


def _embedder(tiny_model):
    from vembed.models.factory import create_embedder
    from vembed.settings import load_settings

    return create_embedder(str(tiny_model), load_settings(None, ["model.device=cpu"]).model)


def test_mine_file_keeps_records_verbatim_and_adds_negatives(tiny_model, tmp_path):
    data = _write_records(tmp_path, categories=True)
    out = tmp_path / "mined.jsonl"
    summary = mine_file(_embedder(tiny_model), data, out, k=4, options=QUIET)
    inputs = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(inputs) == 12
    for before, after in zip(inputs, rows, strict=True):
        assert {k: v for k, v in after.items() if k != "negatives"} == before
        assert list(after)[: len(before)] == list(before)  # key order kept
        assert 0 < len(after["negatives"]) <= 4
        labels = {r["image"]: r["label"] for r in inputs}
        assert all(labels[n] != before["label"] for n in after["negatives"])
    assert summary["records"] == 12 and summary["negatives"] == sum(len(r["negatives"]) for r in rows)
    assert summary["mean_negatives"] == pytest.approx(summary["negatives"] / 12)
    # the output reads back as training records whose negatives resolve to records of the file
    records = read_records(out).images()
    indices = negative_indices(records)
    assert [[records[j].image for j in row] for row in indices] == [list(r.negatives) for r in records]

    same = mine_file(
        _embedder(tiny_model), data, tmp_path / "same.jsonl", k=4, same_category=True, options=QUIET,
    )  # fmt: skip
    assert same["records"] == 12
    for row in map(json.loads, (tmp_path / "same.jsonl").read_text().splitlines()):
        cats = {r["image"]: r["category"] for r in inputs}
        assert all(cats[n] == row["category"] for n in row["negatives"])


def test_no_guard_is_written_as_null_in_the_summary(tiny_model, tmp_path):
    data = _write_records(tmp_path)
    summary = mine_file(
        _embedder(tiny_model), data, tmp_path / "m.jsonl", k=2, margin=math.inf, options=QUIET
    )
    assert summary["margin"] is None and summary["dropped_by_guard"] == 0
    json.dumps(summary, allow_nan=False)  # strict JSON


def test_mine_file_writes_atomically(tiny_model, tmp_path, monkeypatch):
    data = _write_records(tmp_path)
    out = tmp_path / "mined.jsonl"
    out.write_text("previous\n")
    import vembed.io

    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(dst) == out:
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(vembed.io.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        mine_file(_embedder(tiny_model), data, out, k=2, options=QUIET)
    assert out.read_text() == "previous\n"  # untouched, and no temporary left beside it
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["mined.jsonl", "train.jsonl"]


def test_mine_file_errors(tiny_model, tmp_path):
    data = _write_records(tmp_path)
    loaded = []

    def embedder():
        loaded.append(1)
        return _embedder(tiny_model)

    def mine(path, out, **kw):
        mine_file(embedder, path, out, options=QUIET, **kw)

    with pytest.raises(VembedError, match="records file not found"):
        mine(tmp_path / "nope.jsonl", tmp_path / "o.jsonl")
    with pytest.raises(VembedError, match="--k must be a positive integer"):
        mine(data, tmp_path / "o.jsonl", k=0)
    with pytest.raises(VembedError, match="is the input records file"):
        mine(data, data)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(VembedError, match="relative image paths"):
        mine(data, tmp_path / "elsewhere" / "o.jsonl")
    with pytest.raises(VembedError, match="has no 'category'"):
        mine(data, tmp_path / "o.jsonl", same_category=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "c0/0.png"}\n')
    with pytest.raises(VembedError, match=r"bad.jsonl:1: missing field 'label'"):
        mine(bad, tmp_path / "o.jsonl")
    assert not loaded  # every mistake above is found before the model loads
    assert not (tmp_path / "o.jsonl").exists()


# -- the negatives field ------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=200, deadline=None)
@given(value=JSON | st.lists(st.text(max_size=6) | JSON, max_size=5))
def test_negatives_reader_accepts_lists_of_paths_and_refuses_the_rest_with_one_error(value):
    line = json.dumps({"image": "a.png", "label": 1, "negatives": value})
    try:
        rec = parse_record(line, root=Path("/data"), where="f.jsonl:3")
    except VembedError as exc:
        assert str(exc).startswith("f.jsonl:3: ") and "negatives" in str(exc)
        assert not (isinstance(value, list) and all(isinstance(v, str) and v for v in value))
        return
    if value is None:
        assert rec.negatives is None
        return
    assert isinstance(value, list) and all(isinstance(v, str) and v for v in value)
    assert len(rec.negatives) == len(value) and all(isinstance(p, Path) for p in rec.negatives)


def test_negatives_resolve_like_the_image():
    assert parse_negatives(["x/b.png", "/abs/c.png"], root=Path("/data"), where="w") == (
        Path("/data/x/b.png"),
        Path("/abs/c.png"),
    )
    records = [
        ImageRecord(Path("/d/a.png"), 0, negatives=(Path("/d/b.png"),), source="t.jsonl:1"),
        ImageRecord(Path("/d/b.png"), 1, negatives=(Path("/d/zzz.png"),), source="t.jsonl:2"),
    ]
    with pytest.raises(VembedError, match=r"t.jsonl:2: negative /d/zzz.png is not an image"):
        negative_indices(records)
    assert negative_indices(records, skip_unknown=True) == [[1], []]
    assert negative_indices([ImageRecord(Path("/d/a.png"), 0)]) is None


# -- batches ------------------------------------------------------------------------------------------


def _negatives_across_classes(labels, seed=0):
    """Each record's 'mined' negatives: 3 images of other classes, chosen at random (fixed per record)."""
    rng = np.random.default_rng(seed)
    out = []
    for label in labels:
        others = [j for j, other in enumerate(labels) if other != label]
        out.append(rng.choice(others, size=3, replace=False).tolist())
    return out


def test_mined_negatives_land_in_the_batch_of_their_anchor():
    labels = [c for c in range(120) for _ in range(4)]
    negatives = _negatives_across_classes(labels)
    P, K, H = 6, 4, 2
    sampler = PKBatchSampler(labels, P, K, seed=3, negatives=negatives, hard_negatives=H)
    plain = PKBatchSampler(labels, P, K, seed=3)
    assert len(sampler) == len(plain)

    def hits(s):
        """Per batch: how many negatives of the first image of each class group are in the batch."""
        found = 0
        for batch in s:
            assert len(batch) == P * K
            classes = [labels[i] for i in batch]
            assert all(classes.count(c) == K for c in set(classes)) and len(set(classes)) == P  # PK kept
            members = set(batch)
            for g in range(0, len(batch), K):
                found += sum(n in members for n in negatives[batch[g]])
        return found

    s_hits, p_hits = hits(sampler), hits(plain)
    # each drawn class brings H of its anchor's negatives: 2 of every 3 classes are such negatives,
    # so at least (P // (H + 1)) anchors per batch have H negatives each in their batch
    assert s_hits >= len(sampler) * (P // (H + 1)) * H
    assert p_hits < s_hits / 4  # without the feature, random batches rarely hold them
    # a pure function of (seed, epoch): the same batches again, other ones next epoch
    sampler.set_epoch(0)
    first = list(sampler)
    assert first == list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_hard_negative_batches_keep_categories_and_ranks_disjoint():
    labels = [c for c in range(24) for _ in range(3)]
    categories = [c % 3 for c in labels]
    negatives = _negatives_across_classes(labels, seed=1)
    kw = dict(categories=categories, categories_per_batch=2, negatives=negatives, hard_negatives=2, seed=5)
    whole = list(PKBatchSampler(labels, 4, 3, **kw))
    shares = [list(PKBatchSampler(labels, 4, 3, num_replicas=2, rank=r, **kw)) for r in (0, 1)]
    assert shares[0] == whole[0::2][: len(shares[0])] and shares[1] == whole[1::2][: len(shares[1])]
    for batch in whole:
        assert len({categories[i] for i in batch}) <= 2
        assert len({labels[i] for i in batch}) == 4


def test_sampler_negatives_errors():
    labels = [0, 0, 1, 1]
    with pytest.raises(VembedError, match="go together"):
        PKBatchSampler(labels, 2, 2, hard_negatives=1)
    with pytest.raises(VembedError, match="4 records"):
        PKBatchSampler(labels, 2, 2, negatives=[[2]], hard_negatives=1)
    with pytest.raises(VembedError, match=r"negatives\[1\] holds an index outside"):
        PKBatchSampler(labels, 2, 2, negatives=[[2], [9], [], []], hard_negatives=1)
    with pytest.raises(VembedError, match="hard_negatives"):
        PKBatchSampler(labels, 2, 2, negatives=[[2], [], [], []], hard_negatives=0)
