"""Losses for training embedding models: small modules that take ``(embeddings [N, D], labels [N])``.

Pick one by name with :func:`build_loss`::

    loss = build_loss("arcface", embed_dim=768, num_classes=11318, margin=0.4)
    loss = build_loss("infonce", embed_dim=768, matryoshka_dims=[64, 128, 256, 768])

Every loss class declares ``needs_num_classes`` (True for arcface / cosface / ce, which own learnable
class proxies or a classifier) and ``batches``, the batches it needs: ``"pairs"`` (positives in the batch,
two per class suffice: infonce), ``"pk"`` (P classes x K images: supcon, triplet) or ``"any"``.
Pair-based losses take ``mining=`` (a miner of :mod:`vembed.losses.miners`). Any loss may have parameters (also infonce/supcon with ``learnable_temperature=True``):
give ``loss.parameters()`` to the optimizer and keep ``loss.state_dict()`` in checkpoints.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Sequence

from torch import nn

from vembed.errors import VembedError
from vembed.losses.classification import CrossEntropyLoss
from vembed.losses.contrastive import InfoNCELoss, SupConLoss
from vembed.losses.distributed import gather_with_grad
from vembed.losses.margin import ArcFaceLoss, CosFaceLoss
from vembed.losses.matryoshka import MatryoshkaLoss
from vembed.losses.miners import MINERS, MINING_STRATEGIES, build_miner
from vembed.losses.multi_similarity import MultiSimilarityLoss
from vembed.losses.proxy_anchor import ProxyAnchorLoss
from vembed.losses.triplet import TripletLoss

__all__ = [
    "LOSSES",
    "MINERS",
    "MINING_STRATEGIES",
    "ArcFaceLoss",
    "CosFaceLoss",
    "CrossEntropyLoss",
    "InfoNCELoss",
    "MatryoshkaLoss",
    "MultiSimilarityLoss",
    "ProxyAnchorLoss",
    "SupConLoss",
    "TripletLoss",
    "build_loss",
    "build_miner",
    "loss_class",
    "gather_with_grad",
    "loss_options",
]

LOSSES: dict[str, type[nn.Module]] = {
    "infonce": InfoNCELoss,
    "supcon": SupConLoss,
    "arcface": ArcFaceLoss,
    "cosface": CosFaceLoss,
    "triplet": TripletLoss,
    "ce": CrossEntropyLoss,
    "multi_similarity": MultiSimilarityLoss,
    "proxy_anchor": ProxyAnchorLoss,
}

# Options handled by build_loss itself rather than by a loss class.
_WRAPPER_OPTIONS = ("matryoshka_dims", "matryoshka_weights", "memory_bank")


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def loss_class(name: str) -> type[nn.Module]:
    """The class registered as ``name`` (its ``batches`` says which batches it needs)."""
    return LOSSES[_check_name(name)]


def loss_options(name: str) -> dict[str, object]:
    """The options a loss accepts, with their defaults (``embed_dim``/``num_classes`` excluded; a
    ``default_<option>`` class attribute is the default of an option whose argument defaults to None)."""
    cls = LOSSES[_check_name(name)]
    params = inspect.signature(cls.__init__).parameters
    return {
        key: getattr(cls, f"default_{key}", p.default) if p.default is None else p.default
        for key, p in params.items()
        if key not in ("self", "embed_dim", "num_classes") and p.kind is not p.VAR_KEYWORD
    }


def _check_name(name: str) -> str:
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in LOSSES:
        valid = ", ".join(LOSSES)
        raise VembedError(
            f"unknown loss {name!r}; valid losses: {valid}{_did_you_mean(str(key), list(LOSSES))}"
        )
    return key


def build_loss(name: str, *, embed_dim: int, num_classes: int | None = None, **options) -> nn.Module:
    """Create the loss registered as ``name`` (see ``LOSSES``).

    Args:
        name: "infonce", "supcon", "arcface", "cosface", "triplet" or "ce" (case-insensitive).
        embed_dim: width of the embeddings the loss will receive.
        num_classes: number of training classes; required by arcface/cosface/ce (labels must then be
            ids in ``[0, num_classes)``), ignored by the others.
        **options: keyword arguments of the loss class (e.g. ``temperature=0.07``, ``margin=0.3``,
            ``mining="semihard"``), plus ``matryoshka_dims=[...]`` (and optional ``matryoshka_weights``)
            to wrap a pair-based loss in :class:`MatryoshkaLoss`. ``None``/``[]`` means no wrapping;
            ``memory_bank=N``: a cross-batch memory of the last N embeddings (:mod:`vembed.losses.memory`)
            for infonce, supcon, triplet and multi_similarity.

    Raises:
        VembedError: unknown name or option, missing num_classes, invalid values, or matryoshka_dims with
            a proxy/classifier loss.
    """
    key = _check_name(name)
    cls = LOSSES[key]
    matryoshka_dims = options.pop("matryoshka_dims", None)
    matryoshka_weights = options.pop("matryoshka_weights", None)
    memory_bank = options.pop("memory_bank", None)

    accepted = loss_options(key)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        valid = ", ".join([*accepted, *_WRAPPER_OPTIONS])
        raise VembedError(
            f"unknown option {unknown[0]!r} for loss '{key}'; valid options: {valid}"
            f"{_did_you_mean(unknown[0], [*accepted, *_WRAPPER_OPTIONS])}"
        )
    if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim < 1:
        raise VembedError(f"embed_dim must be a positive integer, got {embed_dim!r}")

    if matryoshka_dims and cls.needs_num_classes:
        raise VembedError(
            f"matryoshka_dims cannot be used with loss '{key}': it owns class proxies / a classifier for one "
            "embedding width; use infonce, supcon or triplet"
        )

    if cls.needs_num_classes:
        if num_classes is None:
            raise VembedError(f"loss '{key}' needs num_classes (the number of training classes)")
        loss = cls(embed_dim, num_classes, **options)
    else:
        loss = cls(**options)

    if memory_bank:
        if not getattr(cls, "uses_memory", False):
            users = ", ".join(n for n, c in LOSSES.items() if getattr(c, "uses_memory", False))
            raise VembedError(f"memory_bank does not apply to loss '{key}'; it is used by {users}")
        if matryoshka_dims:
            raise VembedError("memory_bank and matryoshka_dims cannot be combined (one memory, one width)")
        from vembed.losses.memory import MemoryBank

        loss.memory = MemoryBank(memory_bank, embed_dim)
    if matryoshka_dims:
        too_wide = [d for d in matryoshka_dims if isinstance(d, int) and d > embed_dim]
        if too_wide:
            raise VembedError(f"matryoshka_dims {too_wide} exceed embed_dim {embed_dim}")
        loss = MatryoshkaLoss(loss, matryoshka_dims, matryoshka_weights)
    elif matryoshka_weights is not None:
        raise VembedError("matryoshka_weights given without matryoshka_dims")
    return loss
