"""Zero-shot classification with a dual encoder: class names → prompts → text embeddings → nearest class.

Each class's embedding is the normalised mean of its prompts' normalised text embeddings (Radford et
al. 2021, the prompt ensemble); an image's class is the one whose embedding is most similar. Labels are
the records' ``label`` values (as text); a templates file has one template a line with ``{}`` or
``{label}`` where the class name goes (default: :data:`IMAGENET_TEMPLATES`, CLIP's 80).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from vembed.errors import VembedError
from vembed.evaluation.base import (
    EmbedOptions,
    EvalResult,
    embed_labelled,
    label_sort_key,
    read_eval_records,
    report_json,
)
from vembed.evaluation.classify import classification_scores
from vembed.models.dual import DualEncoder

# CLIP's prompt ensemble for ImageNet (openai/CLIP, notebooks/Prompt_Engineering_for_ImageNet.ipynb)
IMAGENET_TEMPLATES = [
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
]  # fmt: skip


def read_templates(path: str | Path) -> list[str]:
    """One template a line (``#`` comments and blank lines skipped); each must hold ``{}`` or ``{label}``."""
    path = Path(path)
    if not path.is_file():
        raise VembedError(f"{path}: no such templates file")
    templates = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        text = text.replace("{label}", "{}")
        if text.count("{}") != 1:
            raise VembedError(
                f"{path}:{number}: a template needs exactly one {{}} or {{label}}, got {text!r}"
            )
        templates.append(text)
    if not templates:
        raise VembedError(f"{path}: no templates")
    return templates


def class_embeddings(encoder: DualEncoder, names: list[str], templates: list[str]) -> torch.Tensor:
    """``[C, D]``: per class, the normalised mean of its prompts' embeddings."""
    prompts = [t.format(name) for name in names for t in templates]
    emb = encoder.encode_text(prompts).view(len(names), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=-1)


class ZeroShotEvaluator:
    """``evaluator(model) -> EvalResult``: zero-shot top-1 / top-5 on labelled records."""

    name = "zeroshot"
    primary_metric = "top1"
    greater_is_better = True

    def __init__(self, records, templates: list[str] | None = None, options: EmbedOptions = EmbedOptions()):
        self.records, self.options = records, options
        self.templates = list(templates or IMAGENET_TEMPLATES)

    @property
    def metrics(self) -> list[str]:
        return ["top1", "top5"]

    def __call__(self, model: DualEncoder, *, show_progress: bool = True) -> EvalResult:
        if not hasattr(model, "encode_text"):
            raise VembedError("zero-shot classification needs a model with a text tower (a dual encoder)")
        images = embed_labelled(model, self.records, self.options, description="embedding images")
        names = sorted({str(label) for label in images.labels}, key=label_sort_key)
        if len(names) < 2:
            raise VembedError(f"{images.source}: zero-shot classification needs at least 2 classes")
        classes = class_embeddings(model, names, self.templates)
        column = {name: i for i, name in enumerate(names)}
        scores = classification_scores(
            (images.embeddings @ classes.T).softmax(dim=1), [column[str(x)] for x in images.labels], names
        )
        metrics = {"top1": scores["top1"], "top5": scores["top5"], "num_images": len(images)}
        report = ZeroShotReport(
            getattr(model.spec, "name", ""),
            images.source,
            metrics,
            len(self.templates),
            scores["per_class"],
            names,
            scores["confusion"],
        )
        return EvalResult(metrics, self.primary_metric, True, {"report": report})


@dataclass
class ZeroShotReport:
    model: str
    data: str
    metrics: dict[str, float]
    templates: int
    per_class: dict
    labels: list[str]
    confusion: list[list[int]]
    seconds: float = 0.0

    def to_json(self) -> dict:
        return report_json(self, merged=("metrics",))


def compare_zeroshot(
    models, data: str | Path, *, templates: str | Path | None = None, settings=None, show_progress=True
):
    """:func:`vembed.evaluation.compare.compare` of the zero-shot evaluator over ``models``."""

    from vembed.evaluation.compare import compare
    from vembed.evaluation.image_text import dual_encoder_for
    from vembed.evaluation.options import embed_options
    from vembed.settings import Settings

    settings = settings or Settings()
    chosen = read_templates(templates) if templates is not None else IMAGENET_TEMPLATES
    records = read_eval_records(data, image_root=settings.data.image_root, skip_bad=settings.data.skip_bad)
    options = embed_options(settings, show_progress=show_progress)
    return compare(
        models,
        ZeroShotEvaluator(records, chosen, options),
        load=lambda ref: dual_encoder_for(ref, settings),
        show_progress=show_progress,
        announce=lambda name: f"zero-shot classification by [bold]{name}[/] of {data}",
    )


def evaluate_zeroshot(model, data, *, templates=None, settings=None, show_progress=True) -> ZeroShotReport:
    """Zero-shot top-1 / top-5 of ``model`` on a labelled JSONL file, with its confusion matrix."""
    found = compare_zeroshot(
        [model], data, templates=templates, settings=settings, show_progress=show_progress
    )
    return found.first.report
