"""Task heads: the pieces a model carries on top of its backbone, each saving and loading itself.

The contract (sentence-transformers' module idea): a head has a ``kind``, writes its ``vembed.json``
block (:meth:`Head.config`) and its weights (:meth:`Head.weights`, stored in ``vembed_head.safetensors``
under the ``task_head.`` prefix), and is rebuilt from them by ``cls.from_saved(config, weights)``.
:data:`HEADS` maps each kind to its class; :func:`load_head` is the one reader, and the one model
writer (:func:`vembed.models.factory.save_model`) stores whichever head it is given. A head also
writes its section of the exported model card (:meth:`Head.card`) and may check an export beyond the
embedding (:meth:`Head.check_export`).

The heads: :class:`ClassifierHead` (the linear or cosine classifier a ``ce`` run trains),
:class:`~vembed.models.segmenter.SegmenterHead` (a segmentation decoder) and
:class:`~vembed.models.pairwise.PairwiseHead` (a re-ranker's same/different MLP).

A model folder with a classifier keeps it as its task head (see :mod:`vembed.models.loader`): the
weights (``classifier.weight`` and, for a linear head, ``classifier.bias``) in
``vembed_head.safetensors`` under the ``task_head.`` prefix, and in ``vembed.json``::

    "task_head": {"kind": "classifier", "type": "linear", "embed_dim": 64, "num_classes": 8,
                  "labels": ["healthy", ...], "normalized": false, "scale": 20.0}

``labels[i]`` is the class name of logit ``i``. ``logits = W e + b`` on the model's embedding ``e``
(``normalized``: ``scale * cos(e, w_i)``), exactly what :class:`vembed.losses.classification.CrossEntropyLoss`
computed during training: the loss's standardisation (:class:`Standardize`) is folded into ``W`` and
``b`` when the head is taken from the loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from vembed.errors import VembedError
from vembed.models.loader import VEMBED_CONFIG, LoadedModel, load_model
from vembed.models.pairwise import PairwiseHead
from vembed.models.precision import HeadModule
from vembed.models.segmenter import SegmenterHead


@runtime_checkable
class Head(Protocol):
    """A task head that saves and loads itself (see the module docstring)."""

    kind: ClassVar[str]

    def config(self) -> dict:
        """The ``vembed.json: task_head`` block, ``kind`` included."""

    def weights(self) -> dict[str, torch.Tensor]:
        """Its weights (float32, CPU, contiguous), saved under the ``task_head.`` prefix."""

    @classmethod
    def from_saved(cls, config: dict, weights: dict[str, torch.Tensor], *, where: str) -> Head:
        """Rebuild from what :meth:`config` and :meth:`weights` wrote (a one-line error on a mismatch)."""

    def card(self, model_config: dict) -> tuple[str, str]:
        """The exported model card's lines for this head: ``(python appended to the plain-transformers
        snippet, a markdown section)``."""

    def check_export(self, source: str | Path, out: Path, dtype: str) -> dict[str, float]:
        """Checks of an export beyond its embeddings (``{name: max abs diff}``; raises when too far)."""


def classifier_logits(
    embeddings: torch.Tensor, linear: nn.Linear, *, normalized: bool, scale: float
) -> torch.Tensor:
    """The logits of a linear classifier, or of a cosine one (``scale * cos``, no bias)."""
    if normalized:
        return scale * F.normalize(embeddings, dim=-1) @ F.normalize(linear.weight, dim=-1).T
    return linear(embeddings)


class Standardize(nn.Module):
    """Per-dimension standardisation with running statistics: a BatchNorm without scale or shift.

    Training batches (of 2 or more) are standardised with their own mean and variance, which update the
    running ones; evaluation (and a batch of one) uses the running statistics. The running statistics
    start as a cumulative average (the first batch sets them) and become an exponential one with weight
    ``momentum`` after ``1 / momentum`` batches, so an early validation is already meaningful.
    """

    def __init__(self, dim: int, *, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.momentum, self.eps = float(momentum), float(eps)
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] > 1:
            mean, var = x.mean(dim=0), x.var(dim=0, unbiased=False)
            with torch.no_grad():
                weight = (1.0 / (self.num_batches_tracked + 1).float()).clamp(min=self.momentum)
                self.running_mean.lerp_(mean.detach().float(), weight)
                self.running_var.lerp_(x.detach().float().var(dim=0, unbiased=True), weight)
                self.num_batches_tracked += 1
            return (x - mean) * (var + self.eps).rsqrt()
        return (x - self.running_mean) * (self.running_var + self.eps).rsqrt()

    def fold(self, linear: nn.Linear) -> dict[str, torch.Tensor]:
        """``linear``'s weights with this standardisation folded in: ``W' e + b' = W std(e) + b``."""
        inv_std = (self.running_var.double() + self.eps).rsqrt()
        weight = linear.weight.detach().double() * inv_std[None, :]
        bias = linear.bias.detach().double() if linear.bias is not None else 0.0
        bias = bias - weight @ self.running_mean.double()
        return {"weight": weight.float().cpu(), "bias": bias.float().cpu()}

    def extra_repr(self) -> str:
        return f"{self.running_mean.shape[0]}, momentum={self.momentum}, eps={self.eps}"


class ClassifierHead(HeadModule):
    """Class logits (and probabilities) from embeddings, with the class names of the logits."""

    kind: ClassVar[str] = "classifier"

    def __init__(self, embed_dim: int, labels: Sequence, *, normalized: bool = False, scale: float = 20.0):
        super().__init__()
        if len(labels) < 2:
            raise VembedError(f"a classifier needs at least 2 classes, got {len(labels)}")
        self.labels = list(labels)
        self.normalized = bool(normalized)
        self.scale = float(scale)
        self.classifier = nn.Linear(embed_dim, len(labels), bias=not normalized)

    @property
    def embed_dim(self) -> int:
        return self.classifier.in_features

    @property
    def num_classes(self) -> int:
        return self.classifier.out_features

    @classmethod
    def from_loss(cls, loss: nn.Module, labels: Sequence) -> ClassifierHead:
        """A copy of the classifier a ``ce`` loss trained (its ``classifier``, ``normalized``, ``scale``),
        with the loss's input standardisation (``standardizer``) folded into the linear layer."""
        linear = getattr(loss, "classifier", None)
        if not isinstance(linear, nn.Linear):
            raise VembedError(f"loss {type(loss).__name__} has no classifier to keep")
        if linear.out_features != len(labels):
            raise VembedError(
                f"the classifier has {linear.out_features} outputs but {len(labels)} class names"
            )
        head = cls(linear.in_features, labels, normalized=loss.normalized, scale=loss.scale)
        standardizer = getattr(loss, "standardizer", None)
        if standardizer is not None:
            state = standardizer.fold(linear)
        else:
            state = {k: v.detach().float().cpu() for k, v in linear.state_dict().items()}
        head.classifier.load_state_dict(state)
        return head

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        weight = self.classifier.weight
        return classifier_logits(
            embeddings.to(weight.device, weight.dtype),
            self.classifier,
            normalized=self.normalized,
            scale=self.scale,
        )

    @torch.inference_mode()
    def probabilities(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Softmax over the classes: ``[N, num_classes]`` float32 on the CPU."""
        if embeddings.shape[-1] != self.embed_dim:
            raise VembedError(
                f"the classifier takes {self.embed_dim}-d embeddings, the model gives {embeddings.shape[-1]}-d "
                "(was model.truncate_dim or model.projection_dim changed after training?)"
            )
        return self(embeddings).float().softmax(dim=-1).cpu()

    def config(self) -> dict:
        return {
            "kind": self.kind,
            "type": "cosine" if self.normalized else "linear",
            "embed_dim": self.embed_dim,
            "num_classes": self.num_classes,
            "labels": self.labels,
            "normalized": self.normalized,
            "scale": self.scale,
        }

    @classmethod
    def from_saved(cls, config: dict, weights: dict[str, torch.Tensor], *, where: str) -> ClassifierHead:
        try:
            head = cls(
                int(config["embed_dim"]),
                config["labels"],
                normalized=bool(config.get("normalized", False)),
                scale=float(config.get("scale", 20.0)),
            )
            head.load_state_dict(weights)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise VembedError(f"{where}: the classifier head does not match its weights ({exc})") from None
        return head.eval()

    def card(self, model_config: dict) -> tuple[str, str]:
        return _classifier_card(self.config())

    def check_export(self, source: str | Path, out: Path, dtype: str) -> dict[str, float]:
        return {}  # one linear layer on the embedding, which the export already checks


def classifier_of_loss(loss: nn.Module, labels: Sequence) -> ClassifierHead | None:
    """The classifier a loss trains (``ce``), as a head with these class names; None for other losses."""
    if not isinstance(getattr(loss, "classifier", None), nn.Linear):
        return None
    return ClassifierHead.from_loss(loss, labels)


HEADS: dict[str, type[Head]] = {cls.kind: cls for cls in (ClassifierHead, SegmenterHead, PairwiseHead)}


def load_head(loaded: LoadedModel) -> Head | None:
    """The head saved with a model (``vembed.json: task_head``), or None when it has none."""
    entry = loaded.task_head
    if not entry:
        return None
    where = f"{loaded.ref.name}/{VEMBED_CONFIG}"
    kind = entry.get("kind")
    if kind not in HEADS:
        raise VembedError(
            f"{where}: task_head kind {kind!r} is not one vembed knows ({', '.join(HEADS)}); "
            "was the model saved by a newer vembed?"
        )
    return HEADS[kind].from_saved(entry, loaded.task_head_state, where=where)


def classifier_from(loaded: LoadedModel) -> ClassifierHead | None:
    """The classifier saved with a model, or None when it has none (or another kind of head)."""
    head = load_head(loaded)
    return head if isinstance(head, ClassifierHead) else None


def require_classifier(model: str | Path | LoadedModel, *, revision: str | None = None) -> ClassifierHead:
    """The classifier of ``model`` (read without loading the backbone), or a one-line error."""
    loaded = model if isinstance(model, LoadedModel) else load_model(model, revision=revision, weights=False)
    model = loaded.ref.text
    head = classifier_from(loaded)
    if head is None:
        raise VembedError(
            f"{model}: the model has no classifier head (train one with train.loss=ce, e.g. "
            "recipes/cotton_dinov2s_linear_probe.yaml, and pass its RUN/final); for an embedding model "
            "use `vembed eval knn` or `vembed eval linear-probe`"
        )
    return head


def _classifier_card(task: dict) -> tuple[str, str]:
    """The model card's lines for a classifier head: code (appended to the snippet) and usage text."""
    if task.get("normalized"):
        logits = (
            f"w = torch.nn.functional.normalize(head['task_head.classifier.weight'], dim=-1)\n"
            f"logits = {task.get('scale', 20.0)} * torch.nn.functional.normalize(emb, dim=-1) @ w.T\n"
        )
    else:
        logits = "logits = emb @ head['task_head.classifier.weight'].T + head['task_head.classifier.bias']\n"
    code = (
        "# the classifier head: class probabilities and names\n"
        "import json\n"
        'labels = json.load(open(f"{path}/vembed.json"))["task_head"]["labels"]\n'
        f"{logits}"
        "probs = logits.softmax(dim=-1)\n"
        "predicted = [labels[i] for i in probs.argmax(dim=-1)]\n"
    )
    names = [str(label) for label in task.get("labels", [])]
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
    text = f"""
## Classifier head

{len(names)} classes ({shown}), a {task.get("type", "linear")} layer on the embedding trained with
cross-entropy; `vembed.json: task_head` holds the class names, `vembed_head.safetensors` the weights
(`task_head.classifier.*`). With vembed:

```bash
vembed classify PATH photos/ --top 3              # a table; --jsonl for JSON lines, --grid preds.png
vembed eval classify --model PATH --data test.jsonl --plot confusion.png
```
"""
    return code, text
