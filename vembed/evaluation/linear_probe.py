"""Linear probe: multinomial logistic regression on frozen embeddings (scikit-learn).

Features are standardised with the train split's mean and std (a ``StandardScaler``), which makes the
C grid mean the same across models and lets lbfgs converge in a few dozen iterations.

Each split is embedded once and cached on disk (:mod:`vembed.evaluation.cache`), so later probes of
the same model and files skip the model entirely. The inverse regularisation strength ``C`` is
swept over :data:`C_VALUES` on the train split and chosen by validation top-1 (the smallest C wins
ties: the strongest regularisation that does as well); the chosen model's test top-1 and per-class
accuracy are reported.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vembed.errors import VembedError
from vembed.evaluation.base import (
    EmbedOptions,
    LabelledEmbeddings,
    accuracy_by_class,
    drop_unknown_labels,
    embedder_for,
    model_name,
    read_labelled,
)
from vembed.evaluation.cache import EmbeddingCache, embed_cached
from vembed.models.embedder import Embedder
from vembed.settings import Settings

C_VALUES = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)
MAX_ITER = 1000


@dataclass
class ProbeScore:
    """Test top-1 and per-class accuracy at the chosen ``c``, and validation top-1 for every C tried."""

    top1: float
    per_class: dict[str, float]
    c: float
    val_top1: dict[float, float]
    queries: int
    num_skipped: int = 0


def fit_linear_probe(
    train: LabelledEmbeddings,
    val: LabelledEmbeddings,
    test: LabelledEmbeddings,
    *,
    c_values: Sequence[float] = C_VALUES,
    seed: int = 0,
) -> ProbeScore:
    """Fit one logistic regression per C on ``train``, keep the best on ``val``, score ``test``."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classes = set(train.labels)
    if len(classes) < 2:
        raise VembedError(f"{train.source}: a linear probe needs at least 2 classes, found {len(classes)}")
    val = drop_unknown_labels(val, classes, reference=train.source or "the training records")
    kept = drop_unknown_labels(test, classes, reference=train.source or "the training records")
    x_train, y_train = _arrays(train)
    best = None
    val_top1: dict[float, float] = {}
    for c in c_values:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=MAX_ITER, random_state=seed))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(x_train, y_train)
        val_top1[c] = float(np.mean(model.predict(_arrays(val)[0]) == _arrays(val)[1]))
        if best is None or val_top1[c] > val_top1[best[0]]:
            best = (c, model)
    c, model = best
    predicted = model.predict(_arrays(kept)[0]).tolist()
    truth = _arrays(kept)[1].tolist()
    return ProbeScore(
        top1=float(np.mean([p == t for p, t in zip(predicted, truth, strict=True)])),
        per_class=accuracy_by_class(truth, predicted),
        c=c,
        val_top1=val_top1,
        queries=len(kept),
        num_skipped=len(test) - len(kept),
    )


@dataclass
class ProbeResult:
    """A linear probe of one model on train/val/test files."""

    model: str
    train: str
    val: str
    test: str
    score: ProbeScore
    cached: dict[str, bool]  # split → read from the cache
    seconds: float = 0.0

    def to_json(self) -> dict:
        s = self.score
        return {
            "model": self.model,
            "train": self.train,
            "val": self.val,
            "test": self.test,
            "top1": s.top1,
            "per_class": s.per_class,
            "c": s.c,
            "val_top1": {str(c): v for c, v in s.val_top1.items()},
            "queries": s.queries,
            "num_skipped": s.num_skipped,
            "cached": self.cached,
            "seconds": round(self.seconds, 3),
        }


def evaluate_linear_probe(
    model: str | Path | Embedder,
    train: str | Path,
    val: str | Path,
    test: str | Path,
    *,
    settings: Settings | None = None,
    cache: EmbeddingCache | None = None,
    c_values: Sequence[float] = C_VALUES,
    show_progress: bool = True,
) -> ProbeResult:
    """Embed the three splits (through ``cache`` when given and ``model`` is a reference), then probe.

    The model is loaded only when some split is not cached.
    """
    start = time.perf_counter()
    settings = settings or Settings()
    splits = {"train": train, "val": val, "test": test}
    records = {name: read_labelled(path, settings) for name, path in splits.items()}
    options = EmbedOptions.from_settings(settings, show_progress=show_progress)
    loaded: list[Embedder] = []

    def get_embedder() -> Embedder:
        if not loaded:
            loaded.append(embedder_for(model, settings))
        return loaded[0]

    usable_cache = cache if not isinstance(model, Embedder) else None
    embedded, cached = {}, {}
    for name, recs in records.items():
        embedded[name], cached[name] = embed_cached(
            str(model),
            settings.model,
            recs,
            options,
            usable_cache,
            get_embedder,
            description=f"embedding {name}",
        )
    score = fit_linear_probe(
        embedded["train"], embedded["val"], embedded["test"], c_values=c_values, seed=settings.train.seed
    )
    return ProbeResult(
        model=model_name(model),
        train=str(train),
        val=str(val),
        test=str(test),
        score=score,
        cached=cached,
        seconds=time.perf_counter() - start,
    )


class LinearProbeEvaluator:
    """The evaluator contract: ``{"probe_top1": ...}`` (no cache: the model changes between calls)."""

    primary_metric = "probe_top1"

    def __init__(
        self, train: str | Path, val: str | Path, test: str | Path, *, settings: Settings | None = None
    ):
        self.paths = (train, val, test)
        self.settings = settings or Settings()

    def __call__(self, embedder: Embedder) -> dict[str, float]:
        result = evaluate_linear_probe(embedder, *self.paths, settings=self.settings, show_progress=False)
        return {"probe_top1": result.score.top1}


def _arrays(data: LabelledEmbeddings) -> tuple[np.ndarray, np.ndarray]:
    return data.embeddings.float().numpy(), np.asarray(data.labels)
