"""multi_similarity and proxy_anchor equal pytorch-metric-learning's losses on fixed inputs.

The expected values were computed once with pytorch-metric-learning 2.9.0 (``MultiSimilarityLoss(alpha=2,
beta=50, base=0.5)`` with and without ``MultiSimilarityMiner(epsilon=0.1)``; ``ProxyAnchorLoss(margin=0.1,
alpha=32)`` with the proxies below) and are written here, so the suite does not need the library (it
installs only with ``--no-deps`` beside our torch). When it is installed, the last test compares with it
directly on random inputs.
"""

from __future__ import annotations

import pytest
import torch

from vembed.losses import LOSSES, build_loss
from vembed.settings import TrainSettings
from vembed.training.optim import head_lr, param_groups

LABELS = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 1])
NO_2_3 = torch.tensor([0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 1, 1])  # classes 2 and 3 absent from the batch
PML = {
    "ms_mined": 1.0990217924118042,
    "ms_all": 1.1492700576782227,
    "pa": 38.79877471923828,
    "pa_missing": 42.53276062011719,
}


def fixed_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    embeddings = torch.randn(12, 5, generator=g)
    proxies = torch.randn(4, 5, generator=g)
    return embeddings, proxies


def test_multi_similarity_equals_pytorch_metric_learning():
    emb, _ = fixed_inputs()
    mined = build_loss("multi_similarity", embed_dim=5)  # the multi-similarity miner, epsilon 0.1
    every = build_loss("multi_similarity", embed_dim=5, mining=None)
    assert mined(emb, LABELS).item() == pytest.approx(PML["ms_mined"], rel=1e-5)
    assert every(emb, LABELS).item() == pytest.approx(PML["ms_all"], rel=1e-5)


def test_proxy_anchor_equals_pytorch_metric_learning():
    emb, proxies = fixed_inputs()
    loss = build_loss("proxy_anchor", embed_dim=5, num_classes=4)
    with torch.no_grad():
        loss.proxies.copy_(proxies)
    assert loss(emb, LABELS).item() == pytest.approx(PML["pa"], rel=1e-5)
    assert loss(emb, NO_2_3).item() == pytest.approx(PML["pa_missing"], rel=1e-5)  # P+ = the batch's classes


def test_proxies_learn_at_their_own_rate():
    loss = build_loss("proxy_anchor", embed_dim=5, num_classes=4, proxy_lr_scale=100.0)
    settings = TrainSettings(lr=1e-4)
    groups = param_groups(torch.nn.Linear(2, 2), list(loss.named_parameters()), settings)
    (group,) = [g for g in groups if any(p is loss.proxies for p in g["params"])]
    assert group["lr"] == pytest.approx(100.0 * head_lr(settings))
    assert LOSSES["proxy_anchor"].needs_num_classes and LOSSES["multi_similarity"].batches == "pk"


def test_multi_similarity_miner_keeps_only_the_informative_pairs():
    """s_ap - eps < max_n s_an for positives, s_an + eps > min_p s_ap for negatives (in distances)."""
    from vembed.losses.miners import MultiSimilarityMiner

    # one anchor; distances to 2 positives (0.1, 0.5) and 2 negatives (0.45, 0.9); epsilon 0.1
    d = torch.tensor([[0.0, 0.1, 0.5, 0.45, 0.9]])
    pos = torch.tensor([[False, True, True, False, False]])
    neg = torch.tensor([[False, False, False, True, True]])
    p, n = MultiSimilarityMiner(0.1).pairs(d, pos, neg)
    # positives kept when d_ap + 0.1 > min d_an = 0.45: only 0.5; negatives when d_an - 0.1 < 0.5: only 0.45
    assert p.tolist() == [[False, False, True, False, False]] and n.tolist() == [
        [False, False, False, True, False]
    ]


def test_against_pytorch_metric_learning_when_installed():
    pml = pytest.importorskip(
        "pytorch_metric_learning", reason="pip install pytorch-metric-learning --no-deps"
    )
    from pytorch_metric_learning import losses, miners

    g = torch.Generator().manual_seed(7)
    emb, labels = torch.randn(40, 8, generator=g), torch.randint(0, 6, (40,), generator=g)
    ms = losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5)
    expected = ms(emb, labels, miners.MultiSimilarityMiner(epsilon=0.1)(emb, labels)).item()
    assert build_loss("multi_similarity", embed_dim=8)(emb, labels).item() == pytest.approx(
        expected, rel=1e-5
    )
    pa = losses.ProxyAnchorLoss(num_classes=6, embedding_size=8, margin=0.1, alpha=32)
    ours = build_loss("proxy_anchor", embed_dim=8, num_classes=6)
    with torch.no_grad():
        ours.proxies.copy_(pa.proxies)
    assert ours(emb, labels).item() == pytest.approx(pa(emb, labels).item(), rel=1e-5)
    assert pml.__version__
