"""k-shot prototype accuracy on seen and unseen classes (the Flowers-102 study's protocol).

A class's prototype is the mean of its k support embeddings; each query gets the class whose
prototype is most cosine-similar (ranked by :func:`vembed.neighbours.topk`, the one
neighbour ranking). Top-1 and top-5 accuracy over every query record.

- Default protocol: the support of a class is its first k records in the support file, in file order
  (``vembed prepare ... --shots K`` writes them so that the first k are the k-shot support for any k).
- ``episodes`` > 1: k supports per class drawn at random from the support file, once per seeded
  episode; accuracies are the mean over episodes and ``std`` is their (population) standard deviation.

A prepared folder holds ``seen_support/seen_query`` (test images of the training classes) and
``unseen_support/unseen_query`` (classes held out of training); each set is scored against its own
classes only, so seen and unseen come from class-disjoint sets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vembed.console import log
from vembed.data.records import RecordSet
from vembed.errors import VembedError
from vembed.evaluation.base import (
    EmbedOptions,
    EvalResult,
    LabelledEmbeddings,
    class_list,
    drop_unknown_labels,
    embed_labelled,
    label_sort_key,
    read_eval_records,
)
from vembed.models.embedder import Embedder
from vembed.neighbours import topk

SETS = ("seen", "unseen")
HEATMAP_CLASSES = 8


@dataclass
class ShotScore:
    """Accuracy at one k: top-1, top-5, the episodes' std of top-1 (None for one pass), queries scored."""

    top1: float
    top5: float
    std: float | None
    queries: int

    def to_json(self) -> dict:
        return {"top1": self.top1, "top5": self.top5, "std": self.std, "queries": self.queries}


def class_indices(labels: Sequence) -> dict:
    """``{label: [positions in file order]}``, labels in sorted order."""
    groups: dict = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)
    return {label: groups[label] for label in sorted(groups, key=label_sort_key)}


def prototypes(embeddings: torch.Tensor, picks: Sequence[Sequence[int]]) -> torch.Tensor:
    """Unit-length mean embedding of each class's picked support rows: ``[C, D]``."""
    means = torch.stack([embeddings[torch.as_tensor(list(p), dtype=torch.long)].mean(0) for p in picks])
    return F.normalize(means.float(), dim=-1)


def prototype_accuracy(
    support: LabelledEmbeddings,
    query: LabelledEmbeddings,
    k: int,
    *,
    episodes: int = 1,
    seed: int = 0,
) -> ShotScore:
    """Top-1/top-5 accuracy of classifying ``query`` by its nearest k-shot prototype of ``support``.

    Every query label must occur in the support (see :func:`fewshot_accuracy`, which leaves the
    others out with a warning). A class with fewer than k support records uses all of them.
    """
    if k < 1:
        raise VembedError(f"k must be at least 1, got {k}")
    if episodes < 1:
        raise VembedError(f"episodes must be at least 1, got {episodes}")
    groups = class_indices(support.labels)
    classes = list(groups)
    code = {label: i for i, label in enumerate(classes)}
    unknown = {label for label in query.labels if label not in code}
    if unknown:
        raise VembedError(f"{query.source}: query classes absent from the support: {class_list(unknown)}")
    truth = torch.tensor([code[label] for label in query.labels], dtype=torch.long)
    queries = F.normalize(query.embeddings.float(), dim=-1)
    top1s, top5s = [], []
    for episode in range(episodes):
        if episodes == 1:
            picks = [idx[:k] for idx in groups.values()]
        else:
            rng = np.random.default_rng([seed, k, episode])
            picks = [rng.choice(idx, size=min(k, len(idx)), replace=False) for idx in groups.values()]
        _, ranked = topk(queries, prototypes(support.embeddings, picks), min(5, len(classes)))
        hits = ranked == truth[:, None]
        top1s.append(int(hits[:, 0].sum()) / len(truth))
        top5s.append(int(hits.any(dim=1).sum()) / len(truth))
    std = float(np.std(top1s)) if episodes > 1 else None
    return ShotScore(float(np.mean(top1s)), float(np.mean(top5s)), std, len(query))


def fewshot_accuracy(
    support: LabelledEmbeddings,
    query: LabelledEmbeddings,
    ks: Sequence[int],
    *,
    episodes: int = 1,
    seed: int = 0,
    warn: bool = True,
) -> dict[int, ShotScore]:
    """:func:`prototype_accuracy` for each k, with the bad-input warnings (``warn=False``: silent).

    Queries whose class has no support are left out (one warning naming the file and the classes);
    for each k, classes with fewer than k support records are named, counted and use what there is.
    """
    if len(support) == 0:
        raise VembedError(f"{support.source}: the support set is empty")
    query = drop_unknown_labels(query, set(support.labels), reference=support.source, warn=warn)
    sizes = {label: len(idx) for label, idx in class_indices(support.labels).items()}
    out = {}
    for k in ks:
        short = {label: n for label, n in sizes.items() if n < k}
        if short and warn:
            detail = class_list([f"{label}: {n}" for label, n in short.items()])
            log(
                f"[yellow]warning:[/] {support.source}: k={k}: {len(short)} of {len(sizes)} classes have "
                f"fewer than {k} support images ({detail}); their prototypes use what there is"
            )
        out[k] = prototype_accuracy(support, query, k, episodes=episodes, seed=seed)
    return out


# --------------------------------------------------------------------------------------------------
# prepared folders and whole reports


@dataclass
class FewShotReport:
    """One model's k-shot accuracy per set (``seen``/``unseen``/...), per k, and per width with --dims."""

    model: str
    results: dict[str, dict[int, ShotScore]]
    dims: dict[int, dict[str, dict[int, ShotScore]]] = field(default_factory=dict)
    heatmap: dict | None = None  # {"set", "k", "classes", "matrix"}: prototype cosine similarities
    seconds: float = 0.0

    def to_json(self) -> dict:
        out = {"model": self.model, "results": _results_json(self.results)}
        if self.dims:
            out["dims"] = {str(d): _results_json(r) for d, r in self.dims.items()}
        return out


def fewshot_sets(
    data: str | Path | None = None, support: str | Path | None = None, query: str | Path | None = None
) -> dict[str, tuple[Path, Path]]:
    """``{set name: (support file, query file)}`` from a prepared folder or one ``support``/``query`` pair."""
    if (support is None) != (query is None):
        raise VembedError("--support and --query name one pair: give both")
    if support is not None:
        if data is not None:
            raise VembedError("give either --data DIR or --support F --query F, not both")
        name = Path(support).stem.removesuffix("_support") or "support"
        return {name: (Path(support), Path(query))}
    if data is None:
        raise VembedError("no k-shot data: pass --data DIR (a prepared folder) or --support F --query F")
    folder = Path(data)
    if not folder.is_dir():
        raise VembedError(f"{folder}: not a folder (give a prepared folder, or --support F --query F)")
    sets = {}
    for name in SETS:
        pair = folder / f"{name}_support.jsonl", folder / f"{name}_query.jsonl"
        if pair[0].is_file() and pair[1].is_file():
            sets[name] = pair
        elif pair[0].is_file() or pair[1].is_file():
            present, absent = (pair[0], pair[1]) if pair[0].is_file() else (pair[1], pair[0])
            raise VembedError(f"{present} has no partner: {absent} is missing")
    if not sets:
        raise VembedError(
            f"{folder}: no seen_support.jsonl/seen_query.jsonl or unseen_support.jsonl/unseen_query.jsonl "
            "(write them with `vembed prepare imagefolder DIR --out ... --holdout-classes 0.2 --shots 10`)"
        )
    return sets


def read_fewshot_sets(
    sets: dict[str, tuple[Path, Path]], *, image_root=None, skip_bad: bool = False
) -> dict[str, tuple[RecordSet, RecordSet]]:
    """The records of each ``(support, query)`` pair of :func:`fewshot_sets`."""
    return {
        name: tuple(read_eval_records(p, image_root=image_root, skip_bad=skip_bad) for p in pair)
        for name, pair in sets.items()
    }


class FewShotEvaluator:
    """``evaluator(embedder) -> EvalResult``: k-shot prototype accuracy on each support/query set.

    ``sets`` maps a name (``seen``, ``unseen``, ...) to its ``(support, query)`` records (see
    :func:`read_fewshot_sets`); metrics are ``{set}/top1@{k}shot`` and ``{set}/top5@{k}shot``, the
    first set's top-1 at the smallest k ranks models. ``details["report"]`` is a :class:`FewShotReport`
    (with ``dims`` widths, and the prototype similarities of the first set for the plot).
    """

    name = "fewshot"
    greater_is_better = True

    def __init__(
        self,
        sets: dict[str, tuple[RecordSet, RecordSet]],
        *,
        ks: Sequence[int] = (1, 3, 10),
        episodes: int = 1,
        seed: int = 0,
        dims: Sequence[int] = (),
        embed: EmbedOptions = EmbedOptions(),
    ):
        if not sets:
            raise VembedError("no k-shot sets to evaluate")
        _check_disjoint(sets)
        self.sets, self.ks = dict(sets), sorted(set(ks))
        self.episodes, self.seed, self.dims, self.embed = episodes, seed, list(dims), embed

    @property
    def primary_metric(self) -> str:
        return f"{next(iter(self.sets))}/top1@{self.ks[0]}shot"

    @property
    def metrics(self) -> list[str]:
        return [f"{name}/top{t}@{k}shot" for name in self.sets for k in self.ks for t in (1, 5)]

    def __call__(self, embedder: Embedder, *, show_progress: bool = True) -> EvalResult:
        options = replace(self.embed, show_progress=show_progress)
        embedded = {
            name: (
                embed_labelled(embedder, s, options, description=f"embedding {name} support"),
                embed_labelled(embedder, q, options, description=f"embedding {name} queries"),
            )
            for name, (s, q) in self.sets.items()
        }
        normalize = embedder.normalize

        def score(dim: int | None) -> dict[str, dict[int, ShotScore]]:
            return {
                name: fewshot_accuracy(
                    s.truncated(dim, normalize=normalize),
                    q.truncated(dim, normalize=normalize),
                    self.ks,
                    episodes=self.episodes,
                    seed=self.seed,
                    warn=dim is None,
                )
                for name, (s, q) in embedded.items()
            }

        results = score(None)
        first_set, (support, _) = next(iter(embedded.items()))
        report = FewShotReport(
            model="",
            results=results,
            dims={dim: score(dim) for dim in self.dims},
            heatmap=prototype_similarity(support, self.ks[-1], set_name=first_set),
        )
        metrics = {
            f"{name}/top{t}@{k}shot": getattr(s, f"top{t}")
            for name, by_k in results.items()
            for k, s in by_k.items()
            for t in (1, 5)
        }
        return EvalResult(metrics, self.primary_metric, self.greater_is_better, details={"report": report})


def prototype_similarity(support: LabelledEmbeddings, k: int, *, set_name: str = "") -> dict:
    """Cosine similarities between the k-shot prototypes of the first (up to 8) classes."""
    groups = class_indices(support.labels)
    classes = list(groups)[:HEATMAP_CLASSES]
    protos = prototypes(support.embeddings, [groups[c][:k] for c in classes])
    return {
        "set": set_name,
        "k": k,
        "classes": [str(c) for c in classes],
        "matrix": (protos @ protos.T).tolist(),
    }


def _check_disjoint(records: dict) -> None:
    if "seen" not in records or "unseen" not in records:
        return
    seen = {r.label for r in records["seen"][0].records} | {r.label for r in records["seen"][1].records}
    unseen = {r.label for r in records["unseen"][0].records} | {r.label for r in records["unseen"][1].records}
    shared = seen & unseen
    if shared:
        log(
            f"[yellow]warning:[/] {len(shared)} class(es) occur in both the seen and the unseen files "
            f"({class_list(shared)}): 'unseen' is not held out"
        )


def _results_json(results: dict[str, dict[int, ShotScore]]) -> dict:
    return {name: {str(k): s.to_json() for k, s in by_k.items()} for name, by_k in results.items()}
