"""``train``: the settings section of ``vembed train``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from vembed.settings.augment import AugmentSettings
from vembed.settings.base import Section, split_ints


class LoraSettings(Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA branch.")
    targets: list[str] | None = Field(
        None,
        description="Linear module names to adapt (e.g. q_proj, v_proj, fc1); default: the model spec's "
        "attention projections. Every name given here must exist in the backbone.",
    )

    @field_validator("targets", mode="before")
    @classmethod
    def _split_targets(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value


class TrainSettings(Section):
    """``vembed train``: method, loss, optimisation, sampling, validation and checkpoints.

    ``batch_size`` is per process; the optimiser sees ``batch_size x grad_accum x processes`` images per
    step, and contrastive losses see negatives from every process.
    """

    output_dir: Path = Field(Path("runs/vembed"), description="Run directory.")
    task: str = Field(
        "retrieval",
        description="What is trained (vembed.tasks.TASKS): retrieval, an embedding model (train.loss); "
        "segmentation, a decoder on the patch tokens, pixel cross-entropy (255 ignored), best model by "
        "validation mIoU; image_text, a CLIP / SigLIP dual encoder on image-caption pairs (train.loss "
        "clip or siglip), best by mean_recall@1; rerank, a pairwise re-ranker of train.rerank_from's "
        "neighbours (BCE on mined pairs), best by re-ranked recall@1.",
    )
    towers: Literal["both", "image", "text"] = Field(
        "both",
        description="train.task=image_text: which towers adapt (train.method applies to them; the "
        "others stay frozen).",
    )
    method: Literal["lora", "full", "frozen"] = Field(
        "lora", description="lora: adapters on the backbone; full: every weight; frozen: head/proxies only."
    )
    loss: str = Field(
        "infonce",
        description="infonce, supcon, arcface, cosface, triplet, ce, multi_similarity, proxy_anchor.",
    )
    epochs: int = Field(2, ge=1)
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimiser steps (overrides epochs)."
    )
    batch_size: int = Field(128, ge=2, description="Images per process per micro-batch.")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate of the backbone (AdamW).")
    head_lr: float | None = Field(
        None,
        gt=0,
        description="Learning rate of the projection and the loss's parameters (proxies, classifier, "
        "temperature); default: lr for method=frozen, 10 x lr otherwise.",
    )
    weight_decay: float = Field(0.05, ge=0)
    layer_decay: float | None = Field(
        None, gt=0, le=1, description="Layer-wise lr decay: layer i of L gets lr x layer_decay^(L+1-i)."
    )
    warmup_ratio: float = Field(
        0.05, ge=0, lt=1, description="Linear warm-up share of the steps, then cosine."
    )
    scheduler: Literal["cosine", "step", "constant"] = Field(
        "cosine",
        description="lr after warm-up: cosine decay to 0, step (x step_gamma every step_epochs epochs) or "
        "constant.",
    )
    step_epochs: int | list[int] | None = Field(
        None,
        description="scheduler=step: multiply the lr by step_gamma every N epochs (an integer) or after "
        "each of these epochs (a list).",
    )
    step_gamma: float = Field(0.1, gt=0, le=1, description="scheduler=step: lr factor at each step.")
    grad_clip: float | None = Field(1.0, gt=0, description="Clip the global gradient norm (null: off).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimiser step.")
    precision: Literal["no", "bf16", "fp16"] = Field("no", description="Mixed precision (accelerate).")
    grad_checkpointing: bool = Field(False, description="Recompute activations in backward (less memory).")
    compile: bool = Field(
        False, description="torch.compile the model (inductor): slower start, faster steps on a GPU."
    )
    fused_adamw: bool | None = Field(
        None, description="AdamW's fused kernel (one launch for all parameters); default: on with a GPU."
    )
    grad_cache_chunk: int | None = Field(
        None,
        ge=1,
        description="Gradient cache: embed the batch in chunks of this many images (large contrastive "
        "batches on a small GPU, same gradients).",
    )
    seed: int = 0
    deterministic: bool = Field(False, description="torch.use_deterministic_algorithms (slower on GPU).")
    resume: bool = Field(False, description="Continue from the last checkpoint in output_dir.")
    # loss options (null: the loss's own default)
    temperature: float | None = Field(None, gt=0, description="infonce / supcon temperature.")
    learnable_temperature: bool = Field(False, description="infonce / supcon: learn the temperature.")
    margin: float | None = Field(None, ge=0, description="arcface / cosface / triplet / proxy_anchor margin.")
    scale: float | None = Field(None, gt=0, description="arcface / cosface / ce (normalized) logit scale.")
    mining: Literal["hard", "semihard", "all", "multi_similarity"] | None = Field(
        None,
        description="Miner of triplet (default hard), infonce and supcon (default none), multi_similarity "
        "(default multi_similarity): hard, semihard, all, multi_similarity.",
    )
    memory_bank: int | None = Field(
        None,
        ge=1,
        description="Cross-batch memory: the last N training embeddings (detached, with labels) as extra "
        "pairs for infonce, supcon, triplet and multi_similarity (XBM); kept in checkpoints.",
    )
    loss_options: dict[str, Any] = Field(
        default_factory=dict, description="Other keyword options of the loss (e.g. label_smoothing)."
    )
    matryoshka_dims: list[int] | None = Field(
        None, description="Also train these truncated widths (infonce / supcon / triplet)."
    )
    # train.task=rerank: the pairwise re-ranker
    rerank_from: str | None = Field(
        None,
        description="train.task=rerank: the embedding model whose top train.rerank_top_n neighbours (on "
        "data.train) give the training pairs and (on data.val) the ranking the re-ranker is validated and "
        "calibrated on; also the default model.name (the pairwise model starts from its backbone).",
    )
    rerank_top_n: int = Field(
        5,
        ge=1,
        description="train.task=rerank: neighbours per image mined for pairs and re-scored in validation "
        "(and the re-ranker's default --top-n).",
    )
    # sampling
    sampler: Literal["auto", "pk", "random"] = Field(
        "auto",
        description="pk: P classes x K images per batch; random: shuffled; auto: pk for "
        "infonce/supcon/triplet, random for arcface/cosface/ce.",
    )
    samples_per_class: int | None = Field(
        None, ge=2, description="K of P x K batches; default 2 for infonce, 4 for supcon/triplet."
    )
    categories_per_batch: int | None = Field(
        None,
        ge=1,
        description="Draw each batch's classes from this many record categories (harder negatives).",
    )
    hard_negatives: int | None = Field(
        None,
        ge=0,
        description="Mined hard negatives per drawn class (records with 'negatives': `vembed mine`): each "
        "class a P x K batch draws brings up to this many classes of its anchor's negatives, each with the "
        "negative image in its group (null or 0: off).",
    )
    remine_every: int | None = Field(
        None,
        ge=1,
        description="With train.hard_negatives: mine the training set again with the current model every "
        "N epochs (the negatives are saved in checkpoints, so resume stays exact).",
    )
    augment: AugmentSettings = Field(
        default_factory=lambda: AugmentSettings(),
        description="Training-image augmentation (false: none, the default; true: crops of 90-100 %; or its "
        "keys, which turn it on). "
        "A boolean sets train.augment.enabled: keys given beside it keep it.",
    )
    cache_features: bool = Field(
        True, description="method=frozen: compute backbone features once and train the head on them."
    )
    # validation, model selection, logging, checkpoints
    select: Literal["best", "last"] = Field(
        "best",
        description="final/: the best validated model by select_metric, or the last step's (also the "
        "result without data.val).",
    )
    select_metric: str = Field(
        "map@r", description="Validation metric that ranks models (map@r, recall@K of eval.k, top1...)."
    )
    select_smoothing: int = Field(
        3,
        ge=1,
        description="Rank each validation by the mean of select_metric over it and the ones before it "
        "(this many in all; 1: no smoothing).",
    )
    eval_every: int | None = Field(
        None, ge=1, description="Validate every N steps (default: each epoch end)."
    )
    eval_at_start: bool = Field(True, description="Validate once before training (the zero-shot baseline).")
    checkpoint_every: int | None = Field(
        None, ge=1, description="Checkpoint every N steps (always at each epoch end)."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept on disk (oldest deleted first).")
    log_every: int = Field(10, ge=1, description="Write a metrics.jsonl row every N steps.")
    lora: LoraSettings = Field(default_factory=LoraSettings)

    _split_dims = field_validator("matryoshka_dims", mode="before")(split_ints)

    @field_validator("step_epochs", mode="before")
    @classmethod
    def _step_epochs_list(cls, value: Any) -> Any:
        """``"10"`` is a period, ``"10,15"`` (command line) a list of epochs."""
        return split_ints(value) if isinstance(value, str) and "," in value else value

    @field_validator("step_epochs")
    @classmethod
    def _step_epochs_positive(cls, value: Any) -> Any:
        values = value if isinstance(value, list) else [value]
        if value is not None and (not values or any(v < 1 for v in values)):
            raise ValueError("step_epochs must be an epoch count >= 1 or a list of them")
        return value

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_no(cls, value: Any) -> Any:
        """YAML reads ``precision: no`` (and ``train.precision=no``) as false."""
        return "no" if value is False else value
