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

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vembed.data.records import RecordSet
from vembed.errors import VembedError
from vembed.evaluation.base import (
    EmbedOptions,
    EvalResult,
    LabelledEmbeddings,
    accuracy_by_class,
    drop_unknown_labels,
)
from vembed.evaluation.cache import EmbeddingCache, embed_cached
from vembed.models.embedder import Embedder

if TYPE_CHECKING:
    from vembed.settings import ModelSettings

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


class LinearProbeEvaluator:
    """``evaluator(model) -> EvalResult``: ``{"probe_top1"}`` of a probe fit on ``train``, C chosen on
    ``val``, scored on ``test``; ``details["report"]`` is a :class:`ProbeResult`.

    ``model`` is an :class:`Embedder`, or a model reference when ``load`` is given: then each split's
    embeddings go through ``cache`` (keyed by the reference and ``model_settings``) and the model is
    loaded (``load(reference)``) only when some split is not cached.
    """

    name = "linear-probe"
    primary_metric = "probe_top1"
    greater_is_better = True
    metrics = ["probe_top1"]

    def __init__(
        self,
        train: RecordSet,
        val: RecordSet,
        test: RecordSet,
        *,
        embed: EmbedOptions = EmbedOptions(),
        c_values: Sequence[float] = C_VALUES,
        seed: int = 0,
        cache: EmbeddingCache | None = None,
        model_settings: ModelSettings | None = None,
        load: Callable[[str], Embedder] | None = None,
    ):
        self.splits = {"train": train, "val": val, "test": test}
        self.embed, self.c_values, self.seed = embed, c_values, seed
        self.cache, self.model_settings, self.load = cache, model_settings, load

    def __call__(self, model: Embedder | str | Path, *, show_progress: bool = True) -> EvalResult:
        options = replace(self.embed, show_progress=show_progress)
        loaded: list[Embedder] = []

        def get_embedder() -> Embedder:
            if isinstance(model, Embedder):
                return model
            if self.load is None:
                raise VembedError(f"{model}: a model reference needs LinearProbeEvaluator(load=...)")
            if not loaded:
                loaded.append(self.load(str(model)))
            return loaded[0]

        cache = self.cache if not isinstance(model, Embedder) else None
        embedded, cached = {}, {}
        for name, records in self.splits.items():
            embedded[name], cached[name] = embed_cached(
                str(model) if cache is not None else "",
                self.model_settings,
                records,
                options,
                cache,
                get_embedder,
                description=f"embedding {name}",
            )
        score = fit_linear_probe(
            embedded["train"], embedded["val"], embedded["test"], c_values=self.c_values, seed=self.seed
        )
        train, val, test = (str(r.path) for r in self.splits.values())
        report = ProbeResult(model="", train=train, val=val, test=test, score=score, cached=cached)
        return EvalResult(
            {"probe_top1": score.top1},
            self.primary_metric,
            self.greater_is_better,
            details={"report": report},
        )


def _arrays(data: LabelledEmbeddings) -> tuple[np.ndarray, np.ndarray]:
    return data.embeddings.float().numpy(), np.asarray(data.labels)
