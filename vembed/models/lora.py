"""LoRA adapters on an :class:`Embedder`'s backbone with peft, and merging them back into plain weights.

The target modules are the registry spec's ``lora_targets`` (old and new transformers spellings of the
attention projections) that actually exist in the backbone, or the names given in ``train.lora.targets``.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import Protocol

from torch import nn

from vembed.errors import VembedError
from vembed.models.embedder import Embedder


class LoraOptions(Protocol):
    """What LoRA needs (``train.lora.*`` settings have these attributes)."""

    r: int
    alpha: float
    dropout: float
    targets: Sequence[str] | None


def linear_module_names(backbone: nn.Module) -> list[str]:
    """Distinct last-component names of the backbone's adaptable ``nn.Linear`` modules, sorted.

    Linears owned by an ``nn.MultiheadAttention`` (SigLIP's pooling head) are left out: that module reads
    their weights directly, so an adapter on them would have no effect.
    """
    return sorted({name.rsplit(".", 1)[-1] for name in _adaptable_linears(backbone)})


def lora_target_modules(backbone: nn.Module, candidates: Sequence[str], *, explicit: bool) -> list[str]:
    """Full names of the Linear modules whose last name component is in ``candidates``.

    ``explicit`` (names the user typed): each of them must match. Otherwise (the spec's candidates, which
    list several spellings) at least one must. Errors name the candidates and the Linear names that exist.
    """
    linears = _adaptable_linears(backbone)
    wanted = set(candidates)
    matched = [name for name in linears if name.rsplit(".", 1)[-1] in wanted]
    found = {name.rsplit(".", 1)[-1] for name in matched}
    existing = ", ".join(linear_module_names(backbone)) or "none"
    missing = [c for c in candidates if c not in found]
    if explicit and missing:
        raise VembedError(
            f"train.lora.targets: no Linear module named {', '.join(missing)} in the backbone; "
            f"its Linear modules are: {existing}"
        )
    if not matched:
        raise VembedError(
            f"method=lora: none of the LoRA targets ({', '.join(candidates)}) is a Linear module of the "
            f"backbone; set train.lora.targets to some of: {existing}"
        )
    return matched


def apply_lora(embedder: Embedder, settings: LoraOptions) -> Embedder:
    """Wrap ``embedder.backbone`` in a peft LoRA model; only the adapters stay trainable in the backbone.

    Raises :class:`VembedError` (before any data is read) when no target module matches.
    """
    from peft import LoraConfig, get_peft_model

    explicit = settings.targets is not None
    candidates = list(settings.targets) if explicit else list(embedder.spec.lora_targets)
    targets = lora_target_modules(embedder.backbone, candidates, explicit=explicit)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        bias="none",
    )
    with warnings.catch_warnings():  # peft asks transformers for a renamed property
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        embedder.backbone = get_peft_model(embedder.backbone, config)
    return embedder


def has_lora(embedder: Embedder) -> bool:
    from peft import PeftModel

    return isinstance(embedder.backbone, PeftModel)


def merge_lora(embedder: Embedder) -> Embedder:
    """A plain :class:`Embedder` with the adapters merged into the backbone weights.

    The input is left untouched (the merge happens on a copy); an embedder without LoRA is returned as is.
    """
    if not has_lora(embedder):
        return embedder
    merged = copy.deepcopy(embedder)
    merged.backbone = merged.backbone.merge_and_unload()
    return merged


def _adaptable_linears(backbone: nn.Module) -> list[str]:
    inside_mha = {
        f"{owner}.{child}" if owner else child
        for owner, module in backbone.named_modules()
        if isinstance(module, nn.MultiheadAttention)
        for child, _ in module.named_children()
    }
    return [
        name
        for name, module in backbone.named_modules()
        if isinstance(module, nn.Linear) and name and name not in inside_mha
    ]
