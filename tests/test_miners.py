"""Miners as separate pieces: the same hard-negative choice feeds triplet, InfoNCE and SupCon."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from training_data import make_nuisance_dataset, max_abs_diff, one_thread, tiny_settings

from vembed.errors import VembedError
from vembed.losses import LOSSES, build_loss, build_miner
from vembed.settings import load_settings
from vembed.training import train
from vembed.training.data import LabelledImages, samples_per_class, uses_pk

# The triplet tests' points on the unit circle (degrees) and labels.
ANGLES = (0, 10, 40, 30, 90, 180)
LABELS = torch.tensor([0, 0, 0, 1, 1, 2])
# batch-hard per anchor (see test_losses.test_triplet_hard_mining_picks_hardest): (positive, negative)
HARD = {0: (2, 3), 1: (2, 3), 2: (0, 3), 3: (4, 2), 4: (3, 2)}


def unit(*degrees):
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=1).float()


def _cos(i, j):
    return math.cos(math.radians(ANGLES[i] - ANGLES[j]))


def test_hard_miner_pairs_are_its_triplets():
    emb = unit(*ANGLES)
    distances = 1 - emb @ emb.T
    same = LABELS[:, None] == LABELS[None, :]
    positives, negatives = same & ~torch.eye(6, dtype=torch.bool), ~same
    mined_positives, mined_negatives = build_miner("hard", margin=0.2, loss_name="test").pairs(
        distances, positives, negatives
    )
    assert {i: (int(mined_positives[i].nonzero()), int(mined_negatives[i].nonzero())) for i in HARD} == HARD
    assert not mined_positives[5].any() and not mined_negatives[5].any()


def test_infonce_with_hard_mining_is_a_soft_margin_on_the_hardest_pair():
    t = 0.1
    loss = build_loss("infonce", embed_dim=2, temperature=t, mining="hard")
    expected = sum(math.log1p(math.exp((_cos(a, n) - _cos(a, p)) / t)) for a, (p, n) in HARD.items()) / len(
        HARD
    )
    assert loss(unit(*ANGLES), LABELS).item() == pytest.approx(expected, rel=1e-5)
    plain = build_loss("infonce", embed_dim=2, temperature=t)(unit(*ANGLES), LABELS).item()
    assert plain != pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("name", ["infonce", "supcon"])
def test_mining_every_pair_equals_no_mining(name):
    """'all' with a margin beyond any distance keeps every pair of anchors that have a negative."""
    emb, labels = unit(*ANGLES[:5]), LABELS[:5]  # every anchor has a positive and a negative
    mined = build_loss(name, embed_dim=2, mining="all", mining_margin=5.0)(emb, labels)
    assert mined.item() == pytest.approx(build_loss(name, embed_dim=2)(emb, labels).item(), rel=1e-6)


def test_supcon_with_hard_mining_gets_gradients_only_from_mined_pairs():
    """Point 5 (180 deg) has no positive and is no anchor's hardest negative: mined, it gets no gradient."""
    mined = unit(*ANGLES).requires_grad_(True)
    build_loss("supcon", embed_dim=2, mining="hard")(mined, LABELS).backward()
    plain = unit(*ANGLES).requires_grad_(True)
    build_loss("supcon", embed_dim=2)(plain, LABELS).backward()
    assert mined.grad[5].abs().max() == 0 and plain.grad[5].abs().max() > 0
    assert mined.grad[:5].abs().max() > 0


def test_unknown_miner_is_refused():
    with pytest.raises(VembedError, match="unknown mining 'hardest'.*hard, semihard, all"):
        build_loss("supcon", embed_dim=2, mining="hardest")


def test_losses_declare_the_batches_they_need():
    assert {name: cls.batches for name, cls in LOSSES.items()} == {
        "infonce": "pairs",
        "supcon": "pk",
        "arcface": "any",
        "cosface": "any",
        "triplet": "pk",
        "ce": "any",
        "multi_similarity": "pk",
        "proxy_anchor": "any",
    }
    data = LabelledImages(records=[], labels=[], class_names=[])
    for loss, pk, k in [("infonce", True, 2), ("supcon", True, 4), ("arcface", False, 4)]:
        settings = load_settings(None, [f"train.loss={loss}"]).train
        assert (uses_pk(data, settings), samples_per_class(data, settings)) == (pk, k)


def test_training_with_a_miner_trains_other_weights_than_without(tiny_model, tmp_path):
    """The same seeded run with and without ``train.mining``: a miner that did nothing would give
    bit-identical weights."""
    records = make_nuisance_dataset(tmp_path / "data", per_class=4)
    finals = {}
    for mining in ("semihard", None):
        overrides = ["train.loss=supcon", "train.max_steps=3", "train.eval_at_start=false"]
        overrides += [f"train.mining={mining}"] if mining else []
        settings = tiny_settings(tiny_model, records, tmp_path / f"run-{mining}", *overrides)
        with one_thread():
            result = train(settings, show_progress=False)
        assert result.steps == 3
        finals[mining] = load_file(str(result.final_dir / "model.safetensors"))
    assert finals["semihard"].keys() == finals[None].keys()
    assert max_abs_diff(finals["semihard"], finals[None]) > 0
