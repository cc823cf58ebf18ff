"""The pairwise re-ranker (STIR / open-metric-learning style): two images side by side through one ViT,
an MLP from its pooled features to one same/different logit.

:class:`PairwiseModel` is an :class:`~vembed.models.embedder.Embedder` (backbone + pooling, so the one
model writer saves it and :func:`~vembed.models.loader.load_model` reads it back) whose
:class:`PairwiseHead` (``vembed.json: task_head``, kind ``pairwise``) scores a pair::

    "task_head": {"kind": "pairwise", "feature_dim": 384, "hidden_dim": 384, "layout": "side_by_side",
                  "blend_weight": 0.35, "top_n": 5, "rerank_from": "runs/sop/final"}

``logit = mlp(pool(backbone([a | b])))`` where ``[a | b]`` is the two preprocessed images concatenated
along the width (the backbone interpolates its position embeddings); ``p = sigmoid(logit)``. A ranking
is re-scored by ``w * p + (1 - w) * similarity`` with ``w = blend_weight``, chosen on the validation set
when the re-ranker was trained (0: the re-ranker did not help and changes nothing).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from vembed.errors import VembedError
from vembed.models.embedder import Embedder
from vembed.models.precision import HeadModule

LAYOUT = "side_by_side"


def side_by_side(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``[..., 3, H, W]`` images → ``[..., 3, H, 2W]``: the pair the backbone sees as one image."""
    if left.shape != right.shape:
        raise VembedError(
            f"a pair needs images of one size, got {tuple(left.shape)} and {tuple(right.shape)}"
        )
    return torch.cat([left, right], dim=-1)


class PairwiseHead(HeadModule):
    """Pooled features of a side-by-side pair → one same/different logit; carries the blend weight."""

    kind: ClassVar[str] = "pairwise"

    def __init__(
        self,
        feature_dim: int,
        hidden_dim: int | None = None,
        *,
        blend_weight: float = 0.0,
        top_n: int = 5,
        rerank_from: str | None = None,
    ):
        super().__init__()
        hidden_dim = int(hidden_dim or feature_dim)
        self.mlp = nn.Sequential(nn.Linear(feature_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, 1))
        self.blend_weight = float(blend_weight)
        self.top_n = int(top_n)
        self.rerank_from = rerank_from

    @property
    def feature_dim(self) -> int:
        return self.mlp[0].in_features

    @property
    def hidden_dim(self) -> int:
        return self.mlp[0].out_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        weight = self.mlp[0].weight
        return self.mlp(features.to(weight.device, weight.dtype)).squeeze(-1)

    def config(self) -> dict:
        return {
            "kind": self.kind,
            "layout": LAYOUT,
            "feature_dim": self.feature_dim,
            "hidden_dim": self.hidden_dim,
            "blend_weight": self.blend_weight,
            "top_n": self.top_n,
            "rerank_from": self.rerank_from,
        }

    @classmethod
    def from_saved(cls, config: dict, weights: dict[str, torch.Tensor], *, where: str) -> PairwiseHead:
        if config.get("layout", LAYOUT) != LAYOUT:
            raise VembedError(f"{where}: pairwise layout {config.get('layout')!r} is not {LAYOUT!r}")
        try:
            weight = float(config.get("blend_weight", 0.0))
            if not 0.0 <= weight <= 1.0:
                raise ValueError(f"blend_weight {weight} is outside [0, 1]")
            head = cls(
                int(config["feature_dim"]),
                int(config.get("hidden_dim") or config["feature_dim"]),
                blend_weight=weight,
                top_n=int(config.get("top_n", 5)),
                rerank_from=config.get("rerank_from"),
            )
            head.load_state_dict(weights)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise VembedError(f"{where}: the pairwise head does not match its weights ({exc})") from None
        return head.eval()

    def card(self, model_config: dict) -> tuple[str, str]:
        from vembed.models.registry import FAMILIES

        pooling = model_config.get("pooling", "cls")
        family = FAMILIES.get(model_config.get("family", ""))
        options = family.forward_options if family is not None else {}
        extra = "".join(f", {k}={v!r}" for k, v in options.items())
        prefix = int(model_config.get("num_prefix_tokens", 1))
        pooled = {
            "cls": "hidden.last_hidden_state[:, 0]",
            "mean": f"hidden.last_hidden_state[:, {prefix}:].mean(dim=1)",
            "cls+mean": "torch.cat([hidden.last_hidden_state[:, 0], "
            f"hidden.last_hidden_state[:, {prefix}:].mean(dim=1)], dim=-1)",
            "pooler": "hidden.pooler_output",
        }.get(pooling, f"...  # {pooling} pooling: see vembed.models.embedder")
        code = (
            "# the pairwise re-ranker: images 0 and 1 side by side (concatenated along the width) -> p(same)\n"
            'pixels = processor(images, return_tensors="pt")["pixel_values"]\n'
            "pair = torch.cat([pixels[0:1], pixels[1:2]], dim=-1)\n"
            "with torch.no_grad():\n"
            f"    hidden = model(pixel_values=pair{extra})\n"
            f"pair_feats = {pooled}\n"
            "h = torch.nn.functional.gelu(pair_feats @ head['task_head.mlp.0.weight'].T + head['task_head.mlp.0.bias'])\n"
            "p_same = torch.sigmoid(h @ head['task_head.mlp.2.weight'].T + head['task_head.mlp.2.bias'])[:, 0]\n"
        )
        text = f"""
## Pairwise re-ranker

Scores whether two images show the same item: both preprocessed images side by side (one image twice
as wide) through the backbone, {pooling} pooling, a 2-layer MLP (`task_head.mlp.*`) to one logit. A
ranking's first {self.top_n} results are re-scored by `w * p_same + (1 - w) * cosine similarity` with
`w = {self.blend_weight}` (`vembed.json: task_head.blend_weight`, chosen on the validation set; 0 means
it did not help there). With vembed:

```bash
vembed eval retrieval --model EMBEDDER --data test.jsonl --rerank PATH --top-n {self.top_n}
vembed search store/ query.jpg --rerank PATH --top-n {self.top_n}
```
"""
        return code, text

    def check_export(self, source: str | Path, out: Path, dtype: str) -> dict[str, float]:
        return {}  # the MLP's weights are copied as they are; the backbone is checked by the export


class PairwiseModel(Embedder):
    """An :class:`Embedder` whose :attr:`pair_head` scores side-by-side pairs (``forward(pairs) -> logits``)."""

    def __init__(self, backbone: nn.Module, spec, head: PairwiseHead, *, pooling: str | None = None):
        super().__init__(backbone, spec, pooling=pooling, normalize=True)
        if head.feature_dim != self.feature_dim:
            raise VembedError(
                f"the pairwise head takes {head.feature_dim}-d features, the backbone gives {self.feature_dim}-d"
            )
        self.pair_head = head

    @classmethod
    def from_embedder(cls, embedder: Embedder, head: PairwiseHead) -> PairwiseModel:
        """The embedder's backbone and pooling (GeM's p kept; a projection is not used) with ``head``."""
        model = cls(embedder.backbone, embedder.spec, head, pooling=embedder.pooling)
        if embedder.gem is not None:
            model.gem.load_state_dict(embedder.gem.state_dict())
        return model.to(embedder.device)

    def own_weights(self) -> dict[str, torch.Tensor]:
        """The embedder's own weights (projection, GeM); the pair head is saved as the task head."""
        return {
            k: v
            for k, v in self.state_dict().items()
            if not k.startswith("backbone.") and not k.startswith("pair_head.")
        }

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        """Side-by-side pairs ``[B, 3, H, 2W]`` → logits ``[B]`` (with gradients)."""
        return self.pair_head(self.features(pairs))

    @torch.inference_mode()
    def probabilities(self, pairs: torch.Tensor) -> torch.Tensor:
        """``sigmoid(logit)`` of each pair: float32 ``[B]`` on the CPU."""
        was_training = self.training
        self.eval()
        try:
            out = self(pairs.to(self.device, self.dtype, non_blocking=True))
        finally:
            self.train(was_training)
        return out.float().sigmoid().cpu()
