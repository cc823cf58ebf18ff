"""Corpus-mined hard negatives: each image's nearest images of other labels (``vembed mine``).

:func:`mine_negatives` ranks, for every embedding, the embeddings of other labels by inner product
(cosine similarity for normalised embeddings), exactly, ``chunk_size`` rows at a time (memory grows with
``chunk_size x N``, never ``N x N``), on the embeddings' device. Equal scores are ordered by lower index.

False-negative guard: a candidate is dropped when its similarity to the anchor exceeds the anchor's
similarity to its **most similar positive** (another image of its label) minus ``margin``: it looks at
least as much like the anchor as the anchor's own best match does, so it is most likely the same item
filed under another label (a duplicate, a re-listed product). Anchors without a positive (a class of
one image) have no guard. ``same_category=True`` keeps only candidates of the anchor's ``category``.

:func:`mine_file` embeds a records file with a model and writes it back with a ``negatives`` list per
record: the ``image`` strings of the negatives' records, best first (so they resolve exactly like
``image`` does), every other key of the record kept as it was.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from vembed.console import log
from vembed.data.records import ImageRecord, label_codes, read_records
from vembed.errors import VembedError
from vembed.inference import EmbedOptions, embed_records
from vembed.io import check_output_path, decode_line, raw_lines, write_jsonl
from vembed.neighbours import (
    advancing,
    as_embeddings,
    check_positive_int,
    chunk_bounds,
    ranking_device,
    select_top,
)

__all__ = ["Mined", "mine_file", "mine_negatives", "negative_indices"]


@dataclass
class Mined:
    """Mined negatives of every record: dataset indices and similarities, best first."""

    negatives: list[list[int]]
    scores: list[list[float]]
    dropped_by_guard: int  # other-label candidates removed by the false-negative guard
    without_positive: int  # anchors with no other image of their label (no guard applied)

    def summary(self) -> dict:
        counts = [len(row) for row in self.negatives]
        return {
            "records": len(counts),
            "with_negatives": sum(1 for n in counts if n),
            "negatives": sum(counts),
            "mean_negatives": sum(counts) / len(counts) if counts else 0.0,
            "dropped_by_guard": self.dropped_by_guard,
            "without_positive": self.without_positive,
        }


def mine_negatives(
    embeddings,
    labels: list,
    *,
    k: int = 8,
    margin: float = 0.05,
    categories: list | None = None,
    same_category: bool = False,
    chunk_size: int = 1024,
    index: str = "exact",
    index_settings=None,
    show_progress: bool = False,
) -> Mined:
    """Up to ``k`` nearest other-label embeddings of each embedding (see the module docstring).

    Args:
        embeddings: ``[N, D]`` tensor or array. labels: N labels (any hashable values).
        margin: the guard's margin (>= 0); ``math.inf`` turns the guard off.
        categories: N categories (needed by ``same_category``).
        index: ``exact`` (chunked matrix products), or a faiss kind (``flat``, ``hnsw``, ``ivf``, ...)
            searched ``k + largest class + 3k`` deep (one index per category with ``same_category``);
            the guard's positives are exact either way, but ``dropped_by_guard`` then counts only the
            candidates faiss returned. ``index_settings``: :class:`~vembed.settings.IndexSettings`.
    """
    emb = as_embeddings(embeddings, "embeddings", device=getattr(embeddings, "device", None))
    n = emb.shape[0]
    check_positive_int(k, "k")
    check_positive_int(chunk_size, "chunk_size")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not margin >= 0:
        raise VembedError(f"margin must be a number >= 0, got {margin!r}")
    if len(labels) != n:
        raise VembedError(f"{len(labels)} labels for {n} embeddings")
    codes = torch.tensor(label_codes(labels)[0], dtype=torch.int64, device=emb.device)
    cats = None
    if same_category:
        if categories is None or len(categories) != n or any(c is None for c in categories):
            raise VembedError("same_category needs a category for every record")
        cats = torch.tensor(label_codes(categories)[0], dtype=torch.int64, device=emb.device)
    if index != "exact":
        return _mine_with_faiss(emb, codes, cats, k, margin, index, index_settings, chunk_size, show_progress)
    negatives: list[list[int]] = []
    scores: list[list[float]] = []
    dropped = without_positive = 0
    width = min(k, n)
    for start, stop in advancing(chunk_bounds(n, chunk_size), show_progress, "mining"):
        rows = torch.arange(start, stop, device=emb.device)
        sims = emb[start:stop] @ emb.T
        same = codes[start:stop, None] == codes[None, :]
        positive = same.clone()
        positive[torch.arange(stop - start, device=emb.device), rows] = False
        best_positive = sims.masked_fill(~positive, float("-inf")).amax(dim=1)
        has_positive = positive.any(dim=1)
        without_positive += int((~has_positive).sum())
        threshold = _threshold(best_positive, has_positive, margin)
        candidate = ~same
        if cats is not None:
            candidate &= cats[start:stop, None] == cats[None, :]
        guarded = candidate & (sims > threshold[:, None])
        dropped += int(guarded.sum())
        sims.masked_fill_(~(candidate & ~guarded), float("-inf"))
        values, indices = select_top(sims, width, False)
        _collect(values, indices, negatives, scores)
    return Mined(negatives, scores, dropped, without_positive)


def _threshold(best_positive: torch.Tensor, has_positive: torch.Tensor, margin: float) -> torch.Tensor:
    """The guard: candidates above ``best positive - margin`` are dropped (none without a positive)."""
    guard = has_positive if math.isfinite(margin) else torch.zeros_like(has_positive)
    return torch.where(guard, best_positive - margin, torch.full_like(best_positive, math.inf))


def _collect(values: torch.Tensor, indices: torch.Tensor, negatives: list, scores: list) -> None:
    """Append each row's candidates, best first, up to the first -inf (a masked one)."""
    for value_row, index_row in zip(values.cpu().tolist(), indices.cpu().tolist(), strict=True):
        kept = [(i, v) for i, v in zip(index_row, value_row, strict=True) if v != float("-inf")]
        negatives.append([i for i, _ in kept])
        scores.append([v for _, v in kept])


def _best_positives(emb: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each embedding's similarity to its most similar other member of its label, exactly, class by class."""
    best = torch.full((emb.shape[0],), float("-inf"), device=emb.device)
    order = torch.argsort(codes, stable=True)
    counts = torch.bincount(codes).tolist()
    for members in torch.split(order, counts):
        if len(members) < 2:
            continue
        sims = emb[members] @ emb[members].T
        sims.fill_diagonal_(float("-inf"))
        best[members] = sims.amax(dim=1)
    return best, torch.isfinite(best)


def _mine_with_faiss(emb, codes, cats, k, margin, kind, settings, chunk_size, show_progress) -> Mined:
    """:func:`mine_negatives` with candidates from a faiss index (see there)."""
    from vembed.index.faiss_index import build_index

    n = emb.shape[0]
    best, has_positive = _best_positives(emb, codes)
    threshold = _threshold(best, has_positive, margin).cpu()
    codes_cpu = codes.cpu()
    vectors = emb.cpu().numpy()
    groups = (
        [torch.arange(n)] if cats is None else [torch.nonzero(cats.cpu() == c)[:, 0] for c in cats.unique()]
    )
    negatives: list[list[int]] = [[] for _ in range(n)]
    scores: list[list[float]] = [[] for _ in range(n)]
    dropped = 0
    for members in groups:
        index = build_index(vectors[members.numpy()], kind, settings, show_progress=show_progress)
        largest = int(torch.bincount(codes_cpu[members]).max())
        depth = min(len(members), k + largest + 3 * k)
        for start, stop in advancing(chunk_bounds(len(members), chunk_size), show_progress, "mining"):
            rows = members[start:stop]
            found_scores, found = index.search(vectors[rows.numpy()], depth, settings)
            found = torch.from_numpy(found)
            values = torch.from_numpy(found_scores).float()
            valid = found >= 0
            neighbours = torch.where(valid, members[found.clamp(min=0)], torch.zeros_like(found))
            candidate = valid & (codes_cpu[neighbours] != codes_cpu[rows][:, None])
            guarded = candidate & (values > threshold[rows][:, None])
            dropped += int(guarded.sum())
            values = values.masked_fill(~(candidate & ~guarded), float("-inf"))
            values, order = torch.sort(values, dim=1, descending=True, stable=True)
            row_negatives: list[list[int]] = []
            row_scores: list[list[float]] = []
            _collect(values[:, :k], neighbours.gather(1, order)[:, :k], row_negatives, row_scores)
            for i, negs, vals in zip(rows.tolist(), row_negatives, row_scores, strict=True):
                negatives[i], scores[i] = negs, vals
    return Mined(negatives, scores, dropped, int((~has_positive).sum()))


def negative_indices(records: list[ImageRecord], *, skip_unknown: bool = False) -> list[list[int]] | None:
    """Each record's ``negatives`` (paths) as indices into ``records`` (the first record of that image);
    None when no record has negatives. A negative that is no record's image is an error naming the
    record (``skip_unknown``: passed over)."""
    if all(rec.negatives is None for rec in records):
        return None
    where: dict[Path, int] = {}
    for i, rec in enumerate(records):
        where.setdefault(rec.image, i)
    out = []
    for rec in records:
        row = []
        for path in rec.negatives or ():
            i = where.get(path)
            if i is None:
                if skip_unknown:
                    continue
                raise VembedError(
                    f"{rec.source or rec.image}: negative {path} is not an image of the training records "
                    "(mine the same file you train on: `vembed mine --data TRAIN --out MINED`)"
                )
            row.append(i)
        out.append(row)
    return out


def mine_file(
    embedder,
    data: str | Path,
    out: str | Path,
    *,
    k: int = 8,
    margin: float = 0.05,
    same_category: bool = False,
    image_root: str | Path | None = None,
    options: EmbedOptions | None = None,
    index: str = "auto",
    index_settings=None,
) -> dict:
    """Embed ``data`` (labelled image records) with ``embedder``, mine, write ``out`` atomically; the summary.

    ``embedder`` is an :class:`~vembed.models.embedder.Embedder` or a zero-argument callable returning
    one (loaded only after the records and options have been checked). ``options``: how to embed (every
    image must decode: ``skip_bad`` is not used). ``index``: ``exact``, a faiss kind, or ``auto`` (exact
    up to ``index_settings.faiss_threshold`` images, HNSW above, as ``vembed search`` does).
    """
    options = replace(options or EmbedOptions(), skip_bad=False)

    check_positive_int(k, "--k")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not margin >= 0:
        raise VembedError(f"--margin must be a number >= 0, got {margin!r}")
    data, out = Path(data), Path(out)
    check_output_path(out, what="--out")
    if out.exists() and out.resolve() == data.resolve():
        raise VembedError(f"--out {out} is the input records file; write the mined records to another file")
    records, raw = _labelled_records(data, image_root)
    if image_root is None and out.parent.resolve() != data.parent.resolve():
        relative = next((rec for rec in raw if _relative_paths(rec)), None)
        if relative is not None:
            raise VembedError(
                f"{data}: holds relative image paths (e.g. {relative['image']!r}), which resolve against the "
                f"records file's folder; write --out into {data.parent} (or set data.image_root={data.parent})"
            )
    kind = _index_kind(index, len(records), index_settings)
    categories = [rec.category for rec in records]
    if same_category and any(c is None for c in categories):
        missing = next(rec for rec in records if rec.category is None)
        raise VembedError(f"--same-category: {missing.source} has no 'category'")
    if callable(embedder) and not isinstance(embedder, torch.nn.Module):
        embedder = embedder()
    with torch.inference_mode():
        found = embed_records(embedder, records, options, description="embedding")
    device = ranking_device(embedder)  # the model's GPU when it has one: exact there too, and faster
    mined = mine_negatives(
        found.embeddings if device is None else found.embeddings.to(device),
        [rec.label for rec in records],
        k=k,
        margin=margin,
        categories=categories if same_category else None,
        same_category=same_category,
        index=kind,
        index_settings=index_settings,
    )
    rows = [
        {**row, "negatives": [raw[j]["image"] for j in negatives]}
        for row, negatives in zip(raw, mined.negatives, strict=True)
    ]
    write_jsonl(out, rows)
    summary = mined.summary()
    # JSON has no infinity: a margin of inf (no guard) is written as null
    summary.update(
        k=k, margin=margin if math.isfinite(margin) else None, same_category=same_category, out=str(out)
    )
    return summary


def _index_kind(index: str, count: int, settings) -> str:
    """``exact`` or the faiss kind to mine with."""
    if index == "auto":
        threshold = settings.faiss_threshold if settings is not None else 200_000
        index = "exact" if count <= threshold else "hnsw"
    if index == "exact":
        return index
    from vembed.index.faiss_index import check_index_kind

    return check_index_kind(index)


def _labelled_records(data: Path, image_root) -> tuple[list[ImageRecord], list[dict]]:
    """The validated image records of ``data`` (each with a label) and each line's JSON object as read."""
    record_set = read_records(data, image_root=image_root, require_label=True)
    if record_set.is_pairs or record_set.is_segmentation:
        raise VembedError(
            f"{data}: vembed mine needs labelled image records "
            '({"image": ..., "label": ...}), not pair or segmentation records'
        )
    raw = []
    for lineno, line in raw_lines(data):
        if line.strip():
            raw.append(json.loads(decode_line(line, f"{data}:{lineno}")))
    records = record_set.images()
    if len(records) < 2 or len({rec.label for rec in records}) < 2:
        raise VembedError(f"{data}: mining needs images of at least 2 labels")
    if len(raw) != len(records):  # read_records validated every non-blank line
        raise VembedError(f"{data}: {len(raw)} lines for {len(records)} records")
    return records, raw


def _relative_paths(row: dict) -> bool:
    return any(
        isinstance(row.get(key), str) and not Path(row[key]).expanduser().is_absolute()
        for key in ("image", "resized")
    )


def log_summary(summary: dict) -> None:
    """One human line on stderr (the JSON summary goes to stdout)."""
    log(
        f"mined {summary['negatives']} negatives for {summary['records']} records "
        f"({summary['mean_negatives']:.2f} per record; {summary['dropped_by_guard']} dropped by the guard) "
        f"→ {summary['out']}"
    )
