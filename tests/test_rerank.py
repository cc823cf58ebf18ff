"""The re-ranker's pieces: pair mining, the blend and its calibration, the pairwise head on disk."""

from __future__ import annotations

import pytest
import torch

from vembed.errors import VembedError
from vembed.models.pairwise import PairwiseHead, PairwiseModel, side_by_side
from vembed.rerank import apply_order, blend, choose_weight, pair_accuracy, recall_at_1, rerank_order
from vembed.tasks.rerank.mining import mine_pairs

# -- pair mining -------------------------------------------------------------------------------------


def test_mining_takes_positives_and_negatives_from_the_top_n():
    # 6 items, labels a a b b c c; each row: that item's top 3 by some embedding (itself excluded)
    codes = torch.tensor([0, 0, 1, 1, 2, 2])
    table = torch.tensor(
        [
            [1, 2, 4],  # item 0: its positive 1 first, then negatives 2 and 4
            [2, 0, 3],  # item 1: negative, positive, negative
            [4, 5, 0],  # item 2: no positive in its top 3 -> its label's other item (3) is added
            [2, 1, 0],
            [5, 3, 1],
            [4, 2, 0],
        ]
    )
    pairs = mine_pairs(table, codes)
    by_query = {q: [(c, same) for qq, c, same in pairs if qq == q] for q in range(6)}
    assert by_query[0] == [(1, 1), (2, 0), (4, 0)]
    assert by_query[1] == [(2, 0), (0, 1), (3, 0)]
    assert by_query[2] == [(4, 0), (5, 0), (0, 0), (3, 1)]  # the true positive, since none was in the top 3
    assert by_query[3] == [(2, 1), (1, 0), (0, 0)]
    assert by_query[5] == [(4, 1), (2, 0), (0, 0)]
    assert len(pairs) == 19


def test_fallback_positives_are_the_nearest_same_label_items():
    codes = torch.tensor([0, 0, 0, 1, 1])
    table = torch.tensor([[3, 4], [0, 2], [1, 0], [4, 0], [3, 1]])
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [1.0, 0.0], [1.0, 0.0]])
    pairs = mine_pairs(table, codes, embeddings)
    assert [(c, s) for q, c, s in pairs if q == 0] == [(3, 0), (4, 0), (2, 1), (1, 1)]  # 2 is nearer than 1
    mined_without = mine_pairs(table, codes)
    assert [(c, s) for q, c, s in mined_without if q == 0][2:] == [(1, 1), (2, 1)]  # index order


def test_mining_rejects_a_table_that_does_not_match_the_labels():
    with pytest.raises(VembedError, match="3 neighbour rows but 2 labels"):
        mine_pairs(torch.zeros(3, 2, dtype=torch.long), torch.tensor([0, 1]))


# -- the blend and its calibration --------------------------------------------------------------------


def _table():
    """3 queries (labels 0, 1, 2) over references with labels; each query's top 3 by embedding."""
    reference_codes = torch.tensor([0, 5, 1, 6, 2, 7])
    candidates = torch.tensor([[1, 0, 3], [2, 3, 1], [5, 4, 0]])  # query 0 and 2: wrong top-1
    sims = torch.tensor([[0.9, 0.85, 0.1], [0.8, 0.7, 0.6], [0.9, 0.5, 0.4]])
    query_codes = torch.tensor([0, 1, 2])
    return candidates, sims, query_codes, reference_codes


def test_weight_zero_leaves_the_ranking_unchanged():
    candidates, sims, *_ = _table()
    probs = torch.rand(3, 3)
    order = rerank_order(sims, probs, 0.0)
    assert torch.equal(apply_order(candidates, order), candidates)
    ties = torch.tensor([[0.5, 0.5, 0.5]])
    assert torch.equal(rerank_order(ties, torch.tensor([[0.1, 0.9, 0.5]]), 0.0), torch.tensor([[0, 1, 2]]))


def test_a_good_pairwise_model_fixes_a_planted_wrong_top_1():
    candidates, sims, queries, refs = _table()
    good = (refs[candidates] == queries[:, None]).float() * 0.8 + 0.1  # 0.9 same, 0.1 different
    assert recall_at_1(candidates, queries, refs) == pytest.approx(1 / 3)
    weight, by_weight = choose_weight(candidates, sims, good, queries, refs)
    assert by_weight[0.0] == pytest.approx(1 / 3)
    # query 0: 0.85 vs 0.9 needs w * (0.9 - 0.1) > (1 - w) * 0.05 -> w > 0.0588; query 2: w > 0.333
    assert weight == pytest.approx(0.35)
    assert by_weight[weight] == 1.0
    assert by_weight[0.3] == pytest.approx(2 / 3)
    reranked = apply_order(candidates, rerank_order(sims, good, weight))
    assert reranked.tolist() == [[0, 1, 3], [2, 3, 1], [4, 5, 0]]


def test_a_harmful_pairwise_model_gets_weight_zero():
    candidates, sims, queries, refs = _table()
    harmful = 1.0 - (refs[candidates] == queries[:, None]).float()  # certain, and always wrong
    weight, by_weight = choose_weight(candidates, sims, harmful, queries, refs)
    assert weight == 0.0
    assert all(r <= by_weight[0.0] for r in by_weight.values())
    # equal Recall@1 at a positive weight is not an improvement: weight stays 0
    flat = torch.full_like(sims, 0.5)
    assert choose_weight(candidates, sims, flat, queries, refs)[0] == 0.0


def test_unreadable_candidates_keep_their_embedding_score():
    sims = torch.tensor([[0.9, 0.8]])
    probs = torch.tensor([[float("nan"), 1.0]])
    assert blend(sims, probs, 0.5)[0].tolist() == pytest.approx([0.9, 0.9])
    assert pair_accuracy(torch.tensor([0.9, float("nan"), 0.2]), torch.tensor([1, 1, 1])) == 0.5


# -- the model and its head --------------------------------------------------------------------------


def test_side_by_side_doubles_the_width():
    a, b = torch.zeros(2, 3, 4, 5), torch.ones(2, 3, 4, 5)
    pair = side_by_side(a, b)
    assert pair.shape == (2, 3, 4, 10)
    assert pair[..., :5].sum() == 0 and pair[..., 5:].min() == 1
    with pytest.raises(VembedError, match="one size"):
        side_by_side(a, torch.zeros(2, 3, 4, 6))


def test_pairwise_head_round_trips_through_its_config(tmp_path, tiny_model):
    from vembed.models.factory import create_embedder, save_model
    from vembed.models.heads import load_head
    from vembed.models.loader import load_model
    from vembed.rerank import load_reranker

    embedder = create_embedder(str(tiny_model))
    head = PairwiseHead(embedder.feature_dim, 16, blend_weight=0.4, top_n=7, rerank_from="m")
    model = PairwiseModel.from_embedder(embedder, head)
    pixels = side_by_side(torch.randn(3, 3, 28, 28), torch.randn(3, 3, 28, 28))
    before = model.probabilities(pixels)
    save_model(model, tmp_path / "r", head=head)
    loaded = load_model(tmp_path / "r")
    assert loaded.task_head["kind"] == "pairwise" and loaded.task_head["blend_weight"] == 0.4
    assert isinstance(load_head(loaded), PairwiseHead)
    assert not loaded.head_state  # the MLP is the task head, not the embedder's own weights
    reranker = load_reranker(tmp_path / "r", device="cpu")
    assert reranker.weight == 0.4 and reranker.head.top_n == 7 and reranker.head.hidden_dim == 16
    torch.testing.assert_close(reranker.model.probabilities(pixels), before)


def test_an_embedding_model_is_not_a_reranker(tiny_model):
    from vembed.rerank import load_reranker

    with pytest.raises(VembedError, match="not a re-ranker"):
        load_reranker(tiny_model, device="cpu")


def test_a_blend_weight_outside_0_1_is_refused():
    head = PairwiseHead(4)
    config = {**head.config(), "blend_weight": 1.5}
    with pytest.raises(VembedError, match=r"vembed.json: the pairwise head .*outside \[0, 1\]"):
        PairwiseHead.from_saved(config, head.weights(), where="x/vembed.json")
