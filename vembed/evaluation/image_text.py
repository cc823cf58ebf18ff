"""Image–text retrieval, the Flickr30k / COCO protocol, as an evaluator (``vembed eval image-text`` and the
validation of ``train.task: image_text``).

Every caption is one text→image query whose one relevant item is its image; every image is one
image→text query, right at K when any of its captions is among the K texts retrieved. Both directions
are ranked by :func:`vembed.evaluation.retrieval.retrieval_metrics` (query/gallery, labels = the image's
index). ``rsum`` is the sum of the six recalls in percent (0–600), as the papers report it;
``mean_recall@1`` the mean of t2i and i2t Recall@1 (the default selection metric of training).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vembed.console import log
from vembed.data.captions import CaptionSet, read_captions
from vembed.errors import VembedError
from vembed.evaluation.base import EmbedOptions, EvalResult
from vembed.evaluation.compare import comparison_json as with_deltas
from vembed.evaluation.retrieval import retrieval_metrics
from vembed.inference import embed_records
from vembed.models.dual import DualEncoder, load_dual_encoder

KS = (1, 5, 10)
PRIMARY = "mean_recall@1"
METRICS = [
    *(f"t2i_recall@{k}" for k in KS),
    *(f"i2t_recall@{k}" for k in KS),
    "rsum",
    PRIMARY,
]

__all__ = ["METRICS", "PRIMARY", "ImageTextEvaluator", "ImageTextReport", "evaluate_image_text"]


def image_text_metrics(
    image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, text_owner: Sequence[int], ks=KS
) -> dict[str, float]:
    """t2i / i2t Recall@K, ``rsum`` and ``mean_recall@1`` from embeddings (image ``i`` owns the texts
    whose ``text_owner`` is ``i``)."""
    owners = torch.as_tensor(list(text_owner), dtype=torch.long)
    image_ids = torch.arange(len(image_embeddings))
    t2i = retrieval_metrics(text_embeddings, owners, image_embeddings, image_ids, ks=ks)
    i2t = retrieval_metrics(image_embeddings, image_ids, text_embeddings, owners, ks=ks)
    out = {f"t2i_recall@{k}": float(t2i[f"recall@{k}"]) for k in ks}
    out.update({f"i2t_recall@{k}": float(i2t[f"recall@{k}"]) for k in ks})
    out["rsum"] = 100 * sum(out.values())
    out[PRIMARY] = (out["t2i_recall@1"] + out["i2t_recall@1"]) / 2
    out["num_images"] = len(image_embeddings)
    out["num_captions"] = len(text_embeddings)
    return out


class ImageTextEvaluator:
    """``evaluator(model) -> EvalResult``: t2i and i2t Recall@1/5/10, ``rsum``, ``mean_recall@1``."""

    name = "image-text"
    greater_is_better = True

    def __init__(self, data: CaptionSet, options: EmbedOptions = EmbedOptions(), *, primary: str = PRIMARY):
        if primary not in METRICS:
            raise VembedError(f"select_metric {primary!r}: image-text reports {', '.join(METRICS)}")
        self.data, self.options, self.primary_metric = data, options, primary

    @property
    def metrics(self) -> list[str]:
        return list(METRICS)

    def __call__(self, model: DualEncoder, *, show_progress: bool = True, autocast=None) -> EvalResult:
        if not hasattr(model, "encode_text"):
            raise VembedError("image-text evaluation needs a model with a text tower (a dual encoder)")
        options = self.options
        devices = [model.device] if model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), (autocast or contextlib.nullcontext)():
            found = embed_records(
                model,
                self.data.images(),
                options,
                show_progress=show_progress and options.show_progress,
                description="embedding images",
            )
            if not found.indices:
                raise VembedError(f"{self.data.path}: no image could be embedded")
            data = self.data.subset(found.indices)  # captions of images that failed are left out
            texts, owners = data.flat_captions()
            text_embeddings = model.encode_text(texts, batch_size=max(options.batch_size, 64))
        metrics = image_text_metrics(found.embeddings, text_embeddings, owners)
        report = ImageTextReport(
            getattr(model.spec, "name", ""), str(self.data.path), metrics, 0.0, found.problems
        )
        return EvalResult(metrics, self.primary_metric, True, {"report": report, "problems": found.problems})


def dual_encoder_for(model: str | Path | DualEncoder, settings=None) -> DualEncoder:
    """``model`` itself when it is a dual encoder, else the one it names (``settings.model`` options)."""
    if isinstance(model, DualEncoder):
        return model
    from vembed.settings import Settings

    m = (settings or Settings()).model
    return load_dual_encoder(
        str(model), revision=m.revision, device=m.device, dtype=m.dtype, attention=m.attention
    )


@dataclass
class ImageTextReport:
    """One model's image–text metrics on one captions file (rendered by the CLI, written as JSON)."""

    model: str
    data: str
    metrics: dict[str, float]
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "data": self.data,
            "protocol": "image-text",
            **self.metrics,
            "seconds": round(self.seconds, 3),
            "num_bad_images": len(self.problems),
        }


def read_eval_captions(path: str | Path, settings=None) -> CaptionSet:
    """The captions file an evaluation scores (bad rows logged with ``data.skip_bad``, else an error)."""
    from vembed.settings import Settings

    data = (settings or Settings()).data
    captions = read_captions(path, image_root=data.image_root, skip_bad=data.skip_bad)
    if captions.problems:
        log(f"[yellow]skipped {len(captions.problems)} bad row(s)[/]; first: {captions.problems[0]}")
    return captions


def compare_image_text(models: Sequence, data: str | Path | CaptionSet, *, settings=None, show_progress=True):
    """:func:`vembed.evaluation.compare.compare` of the image–text evaluator over ``models``."""

    from vembed.evaluation.compare import compare
    from vembed.evaluation.options import embed_options
    from vembed.settings import Settings

    settings = settings or Settings()
    captions = data if isinstance(data, CaptionSet) else read_eval_captions(data, settings)
    options = embed_options(settings, show_progress=show_progress)
    return compare(
        models,
        ImageTextEvaluator(captions, options),
        load=lambda ref: dual_encoder_for(ref, settings),
        show_progress=show_progress,
        announce=lambda name: f"image-text evaluation of [bold]{name}[/] on {captions.path}",
    )


def evaluate_image_text(model, data, *, settings=None, show_progress=True) -> ImageTextReport:
    """t2i / i2t Recall@1/5/10 and ``rsum`` of ``model`` on a captions JSONL file."""
    return compare_image_text([model], data, settings=settings, show_progress=show_progress).first.report


def comparison_json(reports: Sequence[ImageTextReport]) -> dict:
    """The first report at the top level, the others under ``compare`` with their deltas."""
    return with_deltas(reports, METRICS)
