"""``train.task: image_text``: a CLIP / SigLIP dual encoder fine-tuned on image–caption pairs.

The pieces the loop asks for (:class:`vembed.tasks.base.Task`): the dual encoder with ``train.method``
applied to the towers ``train.towers`` names, the captioned images, the ``clip`` or ``siglip`` loss
(its temperature starting from the model's own), shuffled image batches (one caption per image drawn
each epoch), the step runner and the image–text evaluator (t2i / i2t Recall@K on ``data.val``).
``final/`` is a plain transformers dual encoder (LoRA merged, the learned temperature written back into
its ``logit_scale``) with its tokenizer and image processor.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import ClassVar

import torch

from vembed.console import log
from vembed.data.captions import CaptionSet, read_captions
from vembed.errors import VembedError
from vembed.evaluation.image_text import METRICS, PRIMARY, ImageTextEvaluator
from vembed.evaluation.options import embed_options
from vembed.io import atomic_dir
from vembed.losses.image_text import PAIR_LOSSES, build_pair_loss
from vembed.models.dual import DualEncoder, apply_method, load_dual_encoder, merged, save_dual_encoder
from vembed.settings import Settings
from vembed.tasks.base import TrainParts
from vembed.tasks.image_text.steps import PairSteps
from vembed.training.data import ShuffledBatchSampler

# train.* keys of other tasks: setting one for image_text is an error naming it
OTHER_KEYS = ("margin", "scale", "mining", "matryoshka_dims", "samples_per_class", "categories_per_batch")


class ImageTextTask:
    """Everything the loop asks of ``train.task: image_text``."""

    name: ClassVar[str] = "image_text"
    keys: ClassVar[tuple[str, ...]] = ("towers",)
    losses: ClassVar[tuple[str, ...]] = tuple(PAIR_LOSSES)

    # -- before anything is loaded ----------------------------------------------------------------

    def loss_name(self, settings: Settings) -> str:
        s = settings.train
        return s.loss.strip().lower() if "loss" in s.model_fields_set else self.losses[0]

    def check(self, settings: Settings) -> None:
        s = settings.train
        name = self.loss_name(settings)
        if name not in PAIR_LOSSES:
            close = difflib.get_close_matches(name, list(PAIR_LOSSES), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise VembedError(
                f"train.loss={s.loss!r}: train.task=image_text trains with {' or '.join(PAIR_LOSSES)}{hint}"
            )
        for key in OTHER_KEYS:
            if key in s.model_fields_set and getattr(s, key) not in (None, False):
                raise VembedError(
                    f"train.{key} does not apply to train.task=image_text (losses clip, siglip)"
                )
        if s.sampler == "pk":
            raise VembedError(
                "train.sampler=pk needs class labels; image_text batches are shuffled images, each with "
                "one of its captions"
            )
        build_pair_loss(name, **self._loss_options(settings, None))  # bad loss options, before any load

    def metrics(self, settings: Settings) -> list[str]:
        return list(METRICS)

    def describe(self, settings: Settings) -> str:
        return f"train.task={self.name}"

    def select_metric(self, settings: Settings) -> str:
        s = settings.train
        return s.select_metric if "select_metric" in s.model_fields_set else PRIMARY

    # -- the run ----------------------------------------------------------------------------------

    def setup(self, settings: Settings, accelerator, *, show_progress: bool = True) -> TrainParts:
        encoder = self.build_model(settings)  # LoRA target errors before any data is read
        data = self.read(settings.data.train, settings, what="training")
        val = self.read(settings.data.val, settings, what="validation") if settings.data.val else None
        encoder.to(accelerator.device)
        loss = build_pair_loss(self.loss_name(settings), **self._loss_options(settings, encoder))
        loss = loss.to(accelerator.device)
        sampler = ShuffledBatchSampler.for_run(len(data.records), settings.train, accelerator)
        evaluator = None
        if val is not None:
            options = embed_options(settings, show_progress=show_progress)
            evaluator = ImageTextEvaluator(val, options, primary=self.select_metric(settings))
        runner = PairSteps(accelerator, encoder, loss, data, settings)
        return TrainParts(encoder, data, loss, sampler, runner, evaluator)

    def build_model(self, settings: Settings) -> DualEncoder:
        """The dual encoder in float32 on the CPU (accelerate places it), ``train.method`` applied per tower."""
        m, s = settings.model, settings.train
        encoder = load_dual_encoder(
            m.name,
            revision=m.revision,
            device="cpu",
            dtype="float32" if m.dtype == "auto" else m.dtype,
            attention=m.attention,
        )
        if s.grad_checkpointing and s.method != "frozen":
            from vembed.training.model import _enable_checkpointing

            _enable_checkpointing(encoder.backbone)
        return apply_method(encoder, s.method, s.towers, s.lora)

    def read(self, path: Path, settings: Settings, *, what: str) -> CaptionSet:
        data = read_captions(path, image_root=settings.data.image_root, skip_bad=settings.data.skip_bad)
        if data.problems:
            log(f"[yellow]skipped {len(data.problems)} bad {what} rows[/] (first: {data.problems[0]})")
        if not data.records:
            raise VembedError(f"{path}: no usable {what} rows")
        return data

    def _loss_options(self, settings: Settings, encoder: DualEncoder | None) -> dict:
        """``train.temperature`` (else the model's own logit scale), ``learnable_temperature`` (default
        on) and ``train.loss_options`` (e.g. ``bias`` of siglip)."""
        s = settings.train
        options: dict = {}
        if s.temperature is not None:
            options["temperature"] = s.temperature
        elif encoder is not None:
            own = {k: float(v.detach().float().reshape(-1)[0]) for k, v in encoder.logit_parameters().items()}
            # all zeros: transformers' initialisation of a never-trained model; the loss's defaults
            # (clip T = 0.07; siglip t = 10, b = -10, the paper's) are the better start then
            if any(own.values()):
                if "logit_scale" in own:
                    options["temperature"] = math.exp(-own["logit_scale"])
                if "logit_bias" in own and self.loss_name(settings) == "siglip":
                    options["bias"] = own["logit_bias"]
        if "learnable_temperature" in s.model_fields_set:
            options["learnable_temperature"] = s.learnable_temperature
        options.update(s.loss_options)
        return options

    # -- the model written at the end -------------------------------------------------------------

    def save(self, out: Path, parts: TrainParts, training: dict) -> None:
        """``final/``: LoRA merged, the loss's temperature (and bias) as the model's logit scale (bias)."""
        encoder = merged(parts.model)
        if encoder is parts.model:
            import copy

            encoder = copy.deepcopy(encoder)
        own = encoder.logit_parameters()
        with torch.no_grad():
            for key, value in parts.loss.model_logits().items():
                if key in own:
                    own[key].fill_(value)
        training = {
            **training,
            "task": self.name,
            "loss": self.loss_name(parts.runner.settings),
            "towers": parts.runner.settings.train.towers,
        }
        with atomic_dir(out) as tmp:
            save_dual_encoder(encoder, tmp, extra={"training": training})
