"""Losses: hand-computed cases, independent reference implementations, gradients, the factory's errors,
and the multi-process gather (simulated, and for real on two gloo processes)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import vembed.losses.memory as pair_losses_module
import vembed.losses.triplet as triplet_module
from vembed.errors import VembedError
from vembed.losses import (
    LOSSES,
    ArcFaceLoss,
    CosFaceLoss,
    CrossEntropyLoss,
    InfoNCELoss,
    MatryoshkaLoss,
    SupConLoss,
    TripletLoss,
    build_loss,
    gather_with_grad,
)


def unit(*angles_deg: float) -> torch.Tensor:
    """Unit vectors in 2-D at the given angles (degrees)."""
    a = torch.tensor([math.radians(x) for x in angles_deg], dtype=torch.float64)
    return torch.stack([a.cos(), a.sin()], dim=1).float()


def clustered_batch(num_classes: int = 4, per_class: int = 4, dim: int = 16, seed: int = 0):
    """Embeddings tightly around one random centre per class, with their labels and the centres."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(num_classes, dim, generator=g), dim=1)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    emb = F.normalize(centres[labels] + 0.05 * torch.randn(len(labels), dim, generator=g), dim=1)
    return emb, labels, centres


# -- references written independently of the implementation (plain loops) ------------------------------


def infonce_reference(emb: torch.Tensor, labels: torch.Tensor, t: float) -> torch.Tensor:
    s = F.normalize(emb, dim=1) @ F.normalize(emb, dim=1).T / t
    per_anchor = []
    for i in range(len(labels)):
        negs = [k for k in range(len(labels)) if labels[k] != labels[i]]
        poss = [j for j in range(len(labels)) if j != i and labels[j] == labels[i]]
        if not negs or not poss:
            continue
        terms = [
            -(s[i, j] - torch.logsumexp(torch.stack([s[i, j], *[s[i, k] for k in negs]]), 0)) for j in poss
        ]
        per_anchor.append(torch.stack(terms).mean())
    return torch.stack(per_anchor).mean()


def supcon_reference(emb: torch.Tensor, labels: torch.Tensor, t: float) -> torch.Tensor:
    s = F.normalize(emb, dim=1) @ F.normalize(emb, dim=1).T / t
    per_anchor = []
    for i in range(len(labels)):
        others = [a for a in range(len(labels)) if a != i]
        poss = [j for j in others if labels[j] == labels[i]]
        if not poss:
            continue
        denom = torch.logsumexp(torch.stack([s[i, a] for a in others]), 0)
        per_anchor.append(torch.stack([denom - s[i, p] for p in poss]).mean())
    return torch.stack(per_anchor).mean()


# -- factory ------------------------------------------------------------------------------------------


def test_registry_names_and_flags():
    assert set(LOSSES) == {
        "infonce", "supcon", "arcface", "cosface", "triplet", "ce", "multi_similarity", "proxy_anchor"
    }  # fmt: skip
    needs = {name for name, cls in LOSSES.items() if cls.needs_num_classes}
    assert needs == {"arcface", "cosface", "ce", "proxy_anchor"}
    for name in LOSSES:
        loss = build_loss(name, embed_dim=8, num_classes=3)
        assert loss.needs_num_classes == (name in needs)
        assert (len(list(loss.parameters())) > 0) == (name in needs)  # no parameters unless asked for


def test_unknown_loss_name_lists_valid_and_closest():
    with pytest.raises(VembedError) as err:
        build_loss("infonse", embed_dim=8)
    message = str(err.value)
    assert "did you mean 'infonce'" in message
    for name in LOSSES:
        assert name in message


def test_unknown_option_is_named():
    with pytest.raises(VembedError, match="temprature.*did you mean 'temperature'"):
        build_loss("infonce", embed_dim=8, temprature=0.1)


def test_factory_value_errors():
    with pytest.raises(VembedError, match="needs num_classes"):
        build_loss("arcface", embed_dim=8)
    with pytest.raises(VembedError, match="mining"):
        build_loss("triplet", embed_dim=8, mining="hardest")
    with pytest.raises(VembedError, match="temperature"):
        build_loss("supcon", embed_dim=8, temperature=0.0)
    with pytest.raises(VembedError, match="label_smoothing"):
        build_loss("ce", embed_dim=8, num_classes=3, label_smoothing=1.0)


@pytest.mark.parametrize("name", ["arcface", "cosface", "ce"])
def test_matryoshka_refused_for_proxy_losses(name):
    with pytest.raises(VembedError, match=f"matryoshka_dims cannot be used with loss '{name}'"):
        build_loss(name, embed_dim=8, num_classes=3, matryoshka_dims=[4, 8])
    with pytest.raises(VembedError, match="matryoshka_dims cannot be used"):
        MatryoshkaLoss(build_loss(name, embed_dim=8, num_classes=3), dims=[4])


def test_matryoshka_dims_checked():
    with pytest.raises(VembedError, match="exceed embed_dim"):
        build_loss("infonce", embed_dim=8, matryoshka_dims=[4, 16])
    with pytest.raises(VembedError, match="repeated"):
        build_loss("infonce", embed_dim=8, matryoshka_dims=[4, 4])
    with pytest.raises(VembedError, match="2 values for 1"):
        build_loss("triplet", embed_dim=8, matryoshka_dims=[4], matryoshka_weights=[1, 2])
    assert isinstance(build_loss("supcon", embed_dim=8, matryoshka_dims=[]), SupConLoss)


def test_bad_inputs_raise():
    loss = InfoNCELoss()
    with pytest.raises(VembedError, match=r"shape \[N, D\]"):
        loss(torch.randn(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(VembedError, match="labels must have shape"):
        loss(torch.randn(4, 3), torch.zeros(5, dtype=torch.long))
    arc = ArcFaceLoss(3, 2)
    with pytest.raises(VembedError, match=r"class ids in \[0, 1\]"):
        arc(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(VembedError, match="embed_dim"):
        arc(torch.randn(4, 5), torch.tensor([0, 1, 1, 0]))


# -- infonce / supcon -----------------------------------------------------------------------------------


def test_infonce_hand_computed():
    # e0 at 0 deg, e1 at 90 deg, e2 at 0 deg; labels [0, 0, 1]; t = 1.
    # s01 = 0, s02 = 1, s12 = 0.
    # anchor 0: positive 1, negative 2: -log(e^0 / (e^0 + e^1)) = log(1 + e)   = 1.313262
    # anchor 1: positive 0, negative 2: -log(e^0 / (e^0 + e^0)) = log 2         = 0.693147
    # anchor 2: no positive -> skipped.  mean = (1.313262 + 0.693147) / 2        = 1.003204
    loss = InfoNCELoss(temperature=1.0)(unit(0, 90, 0), torch.tensor([0, 0, 1]))
    assert loss.item() == pytest.approx((math.log(1 + math.e) + math.log(2)) / 2, abs=1e-6)


def test_infonce_other_positives_are_not_negatives():
    # Three of a kind: no negatives at all -> no valid anchor -> 0 (SupCon, whose denominator holds
    # the other positives, is not 0 here: see test_supcon_hand_computed).
    emb = unit(0, 90, 0).requires_grad_()
    loss = InfoNCELoss(temperature=1.0)(emb, torch.tensor([0, 0, 0]))
    assert loss.item() == 0.0
    loss.backward()
    assert emb.grad is not None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_infonce_matches_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(12, 6, generator=g), dim=1)
    labels = torch.randint(0, 4, (12,), generator=g)
    got = InfoNCELoss(temperature=0.1)(emb, labels)
    assert got.item() == pytest.approx(infonce_reference(emb, labels, 0.1).item(), rel=1e-5)


@pytest.mark.parametrize("learnable", [False, True])
def test_infonce_on_pairs_is_symmetric_nt_xent(learnable):
    # Batch laid out as [a_1..a_B, b_1..b_B], labels [0..B-1, 0..B-1]: the label-aware loss must equal
    # the symmetric cross-entropy over the 2B x 2B similarity matrix (self masked out, target = partner).
    B, t = 6, 0.07
    g = torch.Generator().manual_seed(3)
    a = F.normalize(torch.randn(B, 8, generator=g), dim=1)
    b = F.normalize(a + 0.5 * torch.randn(B, 8, generator=g), dim=1)
    z = torch.cat([a, b])
    labels = torch.arange(B).repeat(2)
    logits = (z @ z.T / t).masked_fill(torch.eye(2 * B, dtype=torch.bool), float("-inf"))
    targets = torch.cat([torch.arange(B, 2 * B), torch.arange(B)])
    a_to_b = F.cross_entropy(logits[:B], targets[:B])
    b_to_a = F.cross_entropy(logits[B:], targets[B:])
    expected = (a_to_b + b_to_a) / 2
    got = InfoNCELoss(temperature=t, learnable_temperature=learnable)(z, labels)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_learnable_temperature_is_a_clamped_log_parameter():
    loss = InfoNCELoss(temperature=0.05, learnable_temperature=True)
    (param,) = list(loss.parameters())
    assert param.item() == pytest.approx(math.log(0.05))
    emb, labels, _ = clustered_batch()
    loss(emb, labels).backward()
    assert param.grad is not None and param.grad.abs().item() > 0
    with torch.no_grad():
        param.fill_(math.log(1e-5))
    assert loss.temperature.item() == pytest.approx(0.01)  # min_temperature
    with pytest.raises(VembedError, match="outside"):
        InfoNCELoss(temperature=5.0, learnable_temperature=True)


def test_supcon_hand_computed():
    # Same three vectors, t = 1, all labels 0: s01 = 0, s02 = 1, s12 = 0.
    # anchor 0: denominator over {1, 2}: log(e^0 + e^1) = 1.313262; positives 1 (s=0), 2 (s=1):
    #           mean(1.313262 - 0, 1.313262 - 1) = 0.813262
    # anchor 1: denominator over {0, 2}: log(e^0 + e^0) = 0.693147; positives 0, 2 (s=0, 0): 0.693147
    # anchor 2: like anchor 0 (s20 = 1, s21 = 0): 0.813262
    # mean = (0.813262 + 0.693147 + 0.813262) / 3 = 0.773224
    loss = SupConLoss(temperature=1.0)(unit(0, 90, 0), torch.tensor([0, 0, 0]))
    lse = math.log(1 + math.e)
    expected = ((lse - 0.5) + math.log(2) + (lse - 0.5)) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_supcon_matches_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(10, 5, generator=g), dim=1)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])  # class 3 has no positive: skipped
    got = SupConLoss(temperature=0.2)(emb, labels)
    assert got.item() == pytest.approx(supcon_reference(emb, labels, 0.2).item(), rel=1e-5)


# -- arcface / cosface / ce -----------------------------------------------------------------------------


def margin_loss_with_axes(cls, **kw):
    loss = cls(2, 2, **kw)
    with torch.no_grad():
        loss.proxies.copy_(torch.eye(2))  # class 0 proxy at 0 deg, class 1 at 90 deg
    return loss


def test_arcface_hand_computed():
    # x at 60 deg, label 0: cos0 = 0.5 (theta = pi/3), cos1 = cos 30 deg = 0.866025.
    # target: cos(pi/3 + 0.5) = cos(1.547198) = 0.023598 (cos0 = 0.5 > cos(pi - 0.5) = -0.877583).
    # loss = -log softmax(30 * [0.023598, 0.866025])[0] = softplus(30 * (0.866025 - 0.023598)) = 25.27282
    loss = margin_loss_with_axes(ArcFaceLoss)(unit(60), torch.tensor([0]))
    expected = F.softplus(torch.tensor(30 * (math.cos(math.pi / 6) - math.cos(math.pi / 3 + 0.5)))).item()
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(25.27282, rel=1e-5)


def test_arcface_threshold_and_easy_margin():
    # x at angle 161.805 deg: cos0 = -0.95 < cos(pi - 0.5) = -0.877583, cos1 = sqrt(1 - 0.95^2) = 0.312250.
    # cos(theta + m) would wrap past pi, so the target is cos0 - m * sin(m) = -0.95 - 0.5 * 0.479426 = -1.189713
    # loss = softplus(30 * (0.312250 + 1.189713)) = 45.05889
    x = torch.tensor([[-0.95, math.sqrt(1 - 0.95**2)]])
    loss = margin_loss_with_axes(ArcFaceLoss)(x, torch.tensor([0]))
    assert loss.item() == pytest.approx(30 * (math.sqrt(1 - 0.95**2) + 0.95 + 0.5 * math.sin(0.5)), rel=1e-5)
    # easy margin: cos0 <= 0 -> no margin, target = cos0 = -0.95: softplus(30 * (0.312250 + 0.95)) = 37.8675
    easy = margin_loss_with_axes(ArcFaceLoss, easy_margin=True)(x, torch.tensor([0]))
    assert easy.item() == pytest.approx(30 * (math.sqrt(1 - 0.95**2) + 0.95), rel=1e-5)


def test_arcface_gradient_finite_when_embedding_equals_proxy():
    loss = margin_loss_with_axes(ArcFaceLoss)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    loss(x, torch.tensor([0, 1])).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(loss.proxies.grad).all()


def test_cosface_hand_computed():
    # x at 60 deg, label 0: logits 30 * [0.5 - 0.35, 0.866025] -> softplus(30 * (0.866025 - 0.15)) = 21.48076
    loss = margin_loss_with_axes(CosFaceLoss)(unit(60), torch.tensor([0]))
    assert loss.item() == pytest.approx(30 * (math.cos(math.pi / 6) - 0.15), rel=1e-5)


def test_ce_hand_computed():
    ce = CrossEntropyLoss(2, 2, standardize=False)
    with torch.no_grad():
        ce.classifier.weight.copy_(torch.eye(2))
        ce.classifier.bias.zero_()
    x, y = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    # logits (1, 0): -log p0 = log(1 + e^-1) = 0.313262, -log p1 = log(1 + e) = 1.313262
    assert ce(x, y).item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    # label smoothing 0.1: 0.9 * 0.313262 + 0.1 * (0.313262 + 1.313262) / 2 = 0.363262
    smooth = CrossEntropyLoss(2, 2, label_smoothing=0.1, standardize=False)
    smooth.load_state_dict(ce.state_dict())
    assert smooth(x, y).item() == pytest.approx(0.9 * 0.313262 + 0.05 * (0.313262 + 1.313262), abs=1e-5)
    # cosine classifier, scale 20: logits (20, 0) -> log(1 + e^-20) = 2.06e-9
    cos = CrossEntropyLoss(2, 2, normalized=True)
    with torch.no_grad():
        cos.classifier.weight.copy_(torch.eye(2) * 3.0)  # the weight norm must not matter
    assert cos(x * 7.0, y).item() == pytest.approx(math.log1p(math.exp(-20)), abs=1e-7)


def test_ce_standardises_its_input_by_default():
    """The linear classifier sees (x - mean) / std of the batch; the running statistics follow."""
    ce = CrossEntropyLoss(2, 2)
    with torch.no_grad():
        ce.classifier.weight.copy_(torch.eye(2))
        ce.classifier.bias.zero_()
    # dim 0: values 11, 13 (mean 12, population std 1) -> -1, +1; dim 1: 5, 5 (std 0) -> 0, 0
    x, y = torch.tensor([[11.0, 5.0], [13.0, 5.0]]), torch.tensor([0, 0])
    # logits (-1, 0) and (1, 0) (eps 1e-5 aside): (log(1 + e) + log(1 + e^-1)) / 2
    expected = (math.log1p(math.e) + math.log1p(math.exp(-1))) / 2
    assert ce(x, y).item() == pytest.approx(expected, abs=1e-4)
    # the first batch sets the running statistics (unbiased variance: 2 for dim 0, 0 for dim 1)
    assert torch.allclose(ce.standardizer.running_mean, torch.tensor([12.0, 5.0]))
    assert torch.allclose(ce.standardizer.running_var, torch.tensor([2.0, 0.0]))
    ce(torch.tensor([[1.0, 1.0], [3.0, 3.0]]), y)  # the second one averages in with weight 1/2
    assert torch.allclose(ce.standardizer.running_mean, torch.tensor([(12 + 2) / 2, (5 + 2) / 2]))
    assert int(ce.standardizer.num_batches_tracked) == 2
    assert "standardizer.running_mean" in ce.state_dict()  # checkpoints carry the statistics
    assert CrossEntropyLoss(2, 2, normalized=True).standardizer is None  # the cosine classifier: no
    with pytest.raises(VembedError, match="standardize=true needs the linear classifier"):
        CrossEntropyLoss(2, 2, normalized=True, standardize=True)


def test_ce_head_folds_the_standardisation_into_one_linear_layer():
    """ClassifierHead.from_loss: W' e + b' equals what the loss computed in eval mode, for any input."""
    from vembed.models.heads import ClassifierHead

    torch.manual_seed(0)
    ce = CrossEntropyLoss(5, 3)
    for _ in range(30):
        ce(3.0 + 0.01 * torch.randn(16, 5), torch.randint(0, 3, (16,)))  # nearly collinear features
    head = ClassifierHead.from_loss(ce, ["a", "b", "c"])
    assert set(head.state_dict()) == {"classifier.weight", "classifier.bias"}
    ce.eval()
    e = 3.0 + 0.01 * torch.randn(8, 5)
    assert torch.allclose(head(e), ce.logits(e), atol=1e-4)
    assert not torch.allclose(ce.classifier(e), ce.logits(e), atol=1e-2)  # the folding did something


# -- triplet --------------------------------------------------------------------------------------------

# Points on the unit circle (degrees) and labels, used by the mining tests:
#   idx:    0    1    2    3    4    5
#   angle:  0   10   40   30   90  180
#   label:  0    0    0    1    1    2
TRIPLET_ANGLES = (0, 10, 40, 30, 90, 180)
TRIPLET_LABELS = torch.tensor([0, 0, 0, 1, 1, 2])


def test_triplet_hard_mining_picks_hardest():
    # anchor 0 (0 deg):  positives 1 (10 deg away), 2 (40)           -> hardest positive 2
    #                    negatives 3 (30), 4 (90), 5 (180)            -> hardest negative 3
    # anchor 1 (10):     positives 0 (10), 2 (30) -> 2;  negatives 3 (20), 4 (80), 5 (170) -> 3
    # anchor 2 (40):     positives 0 (40), 1 (30) -> 0;  negatives 3 (10), 4 (50), 5 (140) -> 3
    # anchor 3 (30):     positive 4 (60) -> 4;           negatives 0 (30), 1 (20), 2 (10), 5 (150) -> 2
    # anchor 4 (90):     positive 3 (60) -> 3;           negatives 0 (90), 1 (80), 2 (50), 5 (90) -> 2
    # anchor 5:          no positive -> skipped
    loss = TripletLoss(margin=0.2, mining="hard")
    a, p, n = loss.mine(unit(*TRIPLET_ANGLES), TRIPLET_LABELS)
    assert a.tolist() == [0, 1, 2, 3, 4]
    assert p.tolist() == [2, 2, 0, 4, 3]
    assert n.tolist() == [3, 3, 3, 2, 2]
    # d = 1 - cos(angle), so relu(d_ap - d_an + 0.2) = cos(neg angle) - cos(pos angle) + 0.2:
    # (cos30 - cos40) + (cos20 - cos30) + (cos10 - cos40) + (cos10 - cos60) + (cos50 - cos60) + 5 * 0.2
    c = lambda deg: math.cos(math.radians(deg))  # noqa: E731
    terms = [c(30) - c(40), c(20) - c(30), c(10) - c(40), c(10) - c(60), c(50) - c(60)]
    expected = sum(t + 0.2 for t in terms) / 5  # = 0.404023
    assert loss(unit(*TRIPLET_ANGLES), TRIPLET_LABELS).item() == pytest.approx(expected, abs=1e-6)


def test_triplet_semihard_and_all_mining():
    emb = unit(*TRIPLET_ANGLES)
    d = 1 - emb @ emb.T
    # semihard: (0, 1): d_ap = 1 - cos10 = 0.0152; negative 3 has d = 0.134 in (0.0152, 0.2152) -> kept.
    #           (0, 2): d_ap = 1 - cos40 = 0.234; no negative in (0.234, 0.434) -> skipped.
    a, p, n = TripletLoss(margin=0.2, mining="semihard").mine(emb, TRIPLET_LABELS)
    triplets = set(zip(a.tolist(), p.tolist(), n.tolist(), strict=True))
    assert (0, 1, 3) in triplets and not any(t[:2] == (0, 2) for t in triplets)
    for i, j, k in triplets:
        assert d[i, j] < d[i, k] < d[i, j] + 0.2
    # all: exactly the margin-violating triplets, by brute force
    a, p, n = TripletLoss(margin=0.2, mining="all").mine(emb, TRIPLET_LABELS)
    got = set(zip(a.tolist(), p.tolist(), n.tolist(), strict=True))
    labels = TRIPLET_LABELS.tolist()
    brute = {
        (i, j, k)
        for i in range(6)
        for j in range(6)
        for k in range(6)
        if i != j and labels[j] == labels[i] and labels[k] != labels[i] and d[i, k] < d[i, j] + 0.2
    }
    assert got == brute and (0, 2, 3) in got
    expected = torch.stack([d[i, j] - d[i, k] + 0.2 for i, j, k in sorted(brute)]).mean()
    assert TripletLoss(margin=0.2, mining="all")(emb, TRIPLET_LABELS).item() == pytest.approx(expected.item())


@pytest.mark.parametrize("mining", ["hard", "semihard", "all"])
def test_triplet_without_valid_triplets_is_zero_with_grad(mining):
    emb = F.normalize(torch.randn(4, 3), dim=1).requires_grad_()
    loss = TripletLoss(mining=mining)(emb, torch.tensor([0, 1, 2, 3]))  # no positives
    assert loss.item() == 0.0
    loss.backward()
    assert emb.grad is not None
    assert TripletLoss(mining=mining)(emb, torch.tensor([5, 5, 5, 5])).item() == 0.0  # no negatives


# -- every loss -----------------------------------------------------------------------------------------


def build_for_test(name: str, centres: torch.Tensor) -> torch.nn.Module:
    num_classes, dim = centres.shape
    loss = build_loss(name, embed_dim=dim, num_classes=num_classes)
    with torch.no_grad():  # proxies / classifier aligned with the class centres
        if name in ("arcface", "cosface", "proxy_anchor"):
            loss.proxies.copy_(centres)
        elif name == "ce":
            loss.classifier.weight.copy_(10 * centres)
            loss.classifier.bias.zero_()
    return loss


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_separable_batch_scores_lower_than_shuffled_labels(name):
    emb, labels, centres = clustered_batch()
    loss = build_for_test(name, centres)
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
    assert not torch.equal(shuffled, labels)
    assert loss(emb, labels).item() < loss(emb, shuffled).item()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradients_reach_embeddings_and_parameters(name):
    emb, labels, centres = clustered_batch()
    emb = (emb + 0.3 * torch.randn_like(emb)).requires_grad_()  # not already perfect
    loss = build_for_test(name, centres)
    value = loss(emb, labels)
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    assert torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0
    for pname, param in loss.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_low_precision_inputs_computed_in_float32(name, dtype):
    emb, labels, centres = clustered_batch()
    loss = build_for_test(name, centres)
    reference = loss(emb.to(dtype).float(), labels)
    got = loss(emb.to(dtype), labels)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-6)


# -- matryoshka -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["infonce", "supcon", "triplet"])
def test_matryoshka_sums_weighted_losses_on_renormalised_prefixes(name):
    emb, labels, _ = clustered_batch(dim=16)
    emb = F.normalize(emb + 0.5 * torch.randn_like(emb), dim=1)
    wrapped = build_loss(name, embed_dim=16, matryoshka_dims=[4, 8, 16], matryoshka_weights=[0.5, 1.0, 2.0])
    assert isinstance(wrapped, MatryoshkaLoss)
    inner = build_loss(name, embed_dim=16)
    expected = sum(
        w * inner(F.normalize(emb[:, :d], dim=1), labels) for d, w in ((4, 0.5), (8, 1.0), (16, 2.0))
    )
    assert wrapped(emb, labels).item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(VembedError, match="exceed the embedding width 8"):
        wrapped(emb[:, :8], labels)


def test_matryoshka_exposes_inner_parameters():
    wrapped = build_loss("infonce", embed_dim=8, learnable_temperature=True, matryoshka_dims=[4, 8])
    assert len(list(wrapped.parameters())) == 1 and wrapped.needs_num_classes is False


# -- distributed ----------------------------------------------------------------------------------------


def test_gather_with_grad_is_identity_on_one_process():
    t = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(t) is t


@pytest.mark.parametrize("name", ["infonce", "supcon", "triplet"])
def test_simulated_two_ranks_equal_one_big_batch(name, monkeypatch):
    """Each rank sees candidates from both ranks: the mean of the rank losses equals the full-batch loss,
    which only holds when each anchor's own column (rank offset + i) is the one masked."""
    g = torch.Generator().manual_seed(0)
    full = F.normalize(torch.randn(8, 5, generator=g), dim=1)
    labels = torch.tensor([0, 1, 2, 3, 1, 0, 3, 2])  # every anchor's positive lives on the other rank
    loss = build_loss(name, embed_dim=5)
    expected = loss(full, labels)

    per_rank = []
    for rank in range(2):
        local = slice(4 * rank, 4 * rank + 4)

        def fake_gather(emb, lab, rank=rank, local=local):
            candidates = full.clone()
            candidates[local] = emb
            return candidates, labels, 4 * rank

        module = triplet_module if name == "triplet" else pair_losses_module  # pair_masks gathers
        monkeypatch.setattr(module, "gather_candidates", fake_gather)
        per_rank.append(loss(full[local], labels[local]))
    assert ((per_rank[0] + per_rank[1]) / 2).item() == pytest.approx(expected.item(), rel=1e-5)


def _distributed_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        g = torch.Generator().manual_seed(0)
        full = F.normalize(torch.randn(8, 5, generator=g), dim=1)
        labels = torch.tensor([0, 1, 2, 3, 1, 0, 3, 2])
        results = {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for name in ("infonce", "supcon", "triplet"):
                emb = full[4 * rank : 4 * rank + 4].clone().requires_grad_()
                value = build_loss(name, embed_dim=5)(emb, labels[4 * rank : 4 * rank + 4])
                value.backward()
                results[name] = (value.detach(), emb.grad)
        results["warnings"] = [str(w.message) for w in caught]
        torch.save(results, f"{out_dir}/rank{rank}.pt")
        dist.barrier()  # no rank tears gloo down while the other still has a collective in flight
    finally:
        dist.destroy_process_group()


def test_real_two_process_gather_matches_one_big_batch(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for rank in ranks:  # the gather is torch's supported path, not the deprecated nn.functional one
        assert not [w for w in rank["warnings"] if "deprecat" in w.lower()], rank["warnings"]

    g = torch.Generator().manual_seed(0)
    full = F.normalize(torch.randn(8, 5, generator=g), dim=1).requires_grad_()
    labels = torch.tensor([0, 1, 2, 3, 1, 0, 3, 2])
    for name in ("infonce", "supcon", "triplet"):
        full.grad = None
        expected = build_loss(name, embed_dim=5)(full, labels)
        expected.backward()
        (loss0, grad0), (loss1, grad1) = ranks[0][name], ranks[1][name]
        assert ((loss0 + loss1) / 2).item() == pytest.approx(expected.item(), rel=1e-5), name
        # all_gather's backward sums every rank's gradient into the owner: d(L0 + L1) = 2 d(L_full)
        torch.testing.assert_close(torch.cat([grad0, grad1]), 2 * full.grad, rtol=1e-4, atol=1e-6)
