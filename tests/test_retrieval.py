"""Tests for vembed.evaluation.retrieval: exact chunked top-k, Recall@K and MAP@R."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vembed.errors import VembedError
from vembed.evaluation.retrieval import labels_to_codes, retrieval_metrics
from vembed.neighbours import topk


def unit(degrees) -> torch.Tensor:
    """Points on the unit circle; their inner product is the cosine of the angle between them."""
    radians = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([radians.cos(), radians.sin()], dim=1).float()


# Six points on the unit circle; nearer in angle means more similar.
ANGLES = [0, 10, 30, 45, 100, 180]
LABELS = [0, 0, 1, 0, 1, 2]  # A A B A B C

# All-vs-all, worked out by hand (angular distance to the others, nearest first):
#   q0 A (R=2): p1 10, p2 30, p3 45, p4 100, p5 180 -> A B A B C  R@1=1 R@3=1 AP@R=(1/2)(1/1)        = 0.5
#   q1 A (R=2): p0 10, p2 20, p3 35, p4 90,  p5 170 -> A B A B C  R@1=1 R@3=1 AP@R                   = 0.5
#   q2 B (R=1): p3 15, p1 20, p0 30, p4 70,  p5 150 -> A A A B C  R@1=0 R@3=0 AP@R                   = 0
#   q3 A (R=2): p2 15, p1 35, p0 45, p4 55,  p5 135 -> B A A B C  R@1=0 R@3=1 AP@R=(1/2)(0 + 1/2)    = 0.25
#   q4 B (R=1): p3 55, p2 70, p5 80, p1 90,  p0 100 -> A B C A A  R@1=0 R@3=1 AP@R                   = 0
#   q5 C (R=0): the only C -> skipped
# Recall@1 = 2/5, Recall@3 = 4/5, Recall@10 = 5/5 (10 > 5 references: all of them), MAP@R = 1.25/5.
ALL_VS_ALL_EXPECTED = {
    "recall@1": 0.4,
    "recall@3": 0.8,
    "recall@10": 1.0,
    "map@r": 0.25,
    "num_queries": 5,
    "num_skipped": 1,
}


def random_integer_data(n: int, dim: int, seed: int) -> torch.Tensor:
    """Small-integer embeddings: inner products are exact in float32 whatever the summation order,
    and there are many equal scores, so rankings can be compared exactly, tie order included."""
    return torch.randint(-2, 3, (n, dim), generator=torch.Generator().manual_seed(seed)).float()


def brute_force_topk(queries, references, k, exclude_self=False):
    """The full similarity matrix, sorted stably (equal scores keep lower index first)."""
    scores = queries.double() @ references.double().T
    if exclude_self:
        scores.fill_diagonal_(-math.inf)
    values, indices = torch.sort(scores, dim=1, descending=True, stable=True)
    return values[:, :k].float(), indices[:, :k]


def brute_force_metrics(queries, labels, references=None, reference_labels=None, ks=(1, 10)):
    """Recall@K and MAP@R from a full stable sort of every reference, written out loop by loop."""
    all_vs_all = references is None
    if all_vs_all:
        references, reference_labels = queries, labels
    _, order = brute_force_topk(queries, references, len(references), exclude_self=all_vs_all)
    recall = dict.fromkeys(ks, 0)
    ap_total, used = 0.0, 0
    for q in range(len(queries)):
        ranked = [int(reference_labels[j]) == int(labels[q]) for j in order[q].tolist()]
        if all_vs_all:
            ranked = ranked[:-1]  # the last entry is the query itself (score -inf)
        r = sum(ranked)
        if r == 0:
            continue
        used += 1
        for k in ks:
            recall[k] += any(ranked[:k])
        ap_total += sum(sum(ranked[: i + 1]) / (i + 1) for i in range(r) if ranked[i]) / r
    return {**{f"recall@{k}": recall[k] / used for k in ks}, "map@r": ap_total / used, "num_queries": used}


# ---------------------------------------------------------------------------------------------------
# hand-computed values


@pytest.mark.parametrize("chunk_size", [1, 2, 4096])
def test_all_vs_all_metrics_match_hand_computed_values(chunk_size):
    metrics = retrieval_metrics(unit(ANGLES), LABELS, ks=(1, 3, 10), chunk_size=chunk_size)
    assert metrics == pytest.approx(ALL_VS_ALL_EXPECTED)


def test_query_gallery_metrics_match_hand_computed_values():
    # Gallery: the six points above, string labels. Three queries, a different size from the gallery:
    #   40 deg B (R=2): p3 5, p2 10, p1 30, p0 40, p4 60, p5 140 -> A B A A B C
    #                   R@1=0 R@3=1 AP@R=(1/2)(0 + 1/2) = 0.25
    #   170 deg C (R=1): p5 10 first -> C ...                R@1=1 R@3=1 AP@R = 1
    #   90 deg D: no D in the gallery -> skipped
    # Recall@1 = 1/2, Recall@3 = 2/2, MAP@R = (0.25 + 1) / 2 = 0.625.
    gallery_labels = ["A", "A", "B", "A", "B", "C"]
    metrics = retrieval_metrics(unit([40, 170, 90]), ["B", "C", "D"], unit(ANGLES), gallery_labels, ks=(1, 3))
    assert metrics == pytest.approx(
        {"recall@1": 0.5, "recall@3": 1.0, "map@r": 0.625, "num_queries": 2, "num_skipped": 1}
    )


def test_topk_hand_computed_order_and_scores():
    scores, indices = topk(unit([40]), unit(ANGLES), k=3)
    assert indices.tolist() == [[3, 2, 1]]
    expected = [math.cos(math.radians(d)) for d in (5, 10, 30)]
    torch.testing.assert_close(scores, torch.tensor([expected]), atol=1e-6, rtol=0)
    assert scores.dtype == torch.float32 and indices.dtype == torch.int64


# ---------------------------------------------------------------------------------------------------
# chunked == unchunked == brute force


@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("k", [1, 5, 39, 40, 100])
def test_topk_equals_brute_force_including_tie_order(exclude_self, k):
    references = random_integer_data(40, 4, seed=0)
    queries = references if exclude_self else random_integer_data(23, 4, seed=1)
    k_available = min(k, 39 if exclude_self else 40)
    expected_scores, expected_indices = brute_force_topk(queries, references, k_available, exclude_self)
    for chunk_size in (7, 4096):
        scores, indices = topk(queries, references, k, chunk_size=chunk_size, exclude_self=exclude_self)
        assert indices.shape == (len(queries), k_available)
        assert torch.equal(indices, expected_indices), f"chunk_size={chunk_size}"
        assert torch.equal(scores, expected_scores), f"chunk_size={chunk_size}"


def test_topk_on_random_float_data_matches_full_matrix():
    gen = torch.Generator().manual_seed(3)
    references = torch.nn.functional.normalize(torch.randn(300, 32, generator=gen), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(50, 32, generator=gen), dim=1)
    expected_scores, expected_indices = brute_force_topk(queries, references, 20)
    scores, indices = topk(queries, references, 20, chunk_size=7)
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(scores, expected_scores, atol=1e-5, rtol=0)


def test_all_tied_scores_rank_by_index():
    # A collapsed model: every embedding equal, every score equal -> lowest indices first.
    same = torch.ones(10, 3)
    _, indices = topk(same, same, k=4, chunk_size=3, exclude_self=True)
    assert indices[0].tolist() == [1, 2, 3, 4]
    assert indices[2].tolist() == [0, 1, 3, 4]
    assert indices[9].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("seed", [0, 1])
def test_metrics_chunked_equal_unchunked_and_brute_force_all_vs_all(seed):
    embeddings = random_integer_data(120, 6, seed=seed)
    labels = torch.randint(0, 30, (120,), generator=torch.Generator().manual_seed(seed + 10))
    ks = (1, 5, 10)
    chunked = retrieval_metrics(embeddings, labels, ks=ks, chunk_size=7)
    whole = retrieval_metrics(embeddings, labels, ks=ks, chunk_size=100_000)
    assert chunked == whole
    expected = brute_force_metrics(embeddings, labels, ks=ks)
    assert {key: chunked[key] for key in expected} == pytest.approx(expected)


def test_metrics_chunked_equal_unchunked_and_brute_force_query_gallery():
    queries, references = random_integer_data(37, 6, seed=4), random_integer_data(90, 6, seed=5)
    gen = torch.Generator().manual_seed(6)
    query_labels, reference_labels = torch.randint(0, 12, (37,), generator=gen), torch.randint(0, 12, (90,))
    chunked = retrieval_metrics(queries, query_labels, references, reference_labels, ks=(1, 4), chunk_size=7)
    whole = retrieval_metrics(queries, query_labels, references, reference_labels, ks=(1, 4))
    assert chunked == whole
    expected = brute_force_metrics(queries, query_labels, references, reference_labels, ks=(1, 4))
    assert {key: chunked[key] for key in expected} == pytest.approx(expected)


def test_map_at_r_ranks_r_neighbours_even_when_r_exceeds_max_k():
    # A class of 4 (R=3 each) and a class of 2 (R=1), ks=(1,): MAP@R still needs 3 neighbours.
    # Points 0-3 (A) at 0-3 deg, 4-5 (B) at 90/91 deg: every query ranks its own class first -> MAP@R = 1.
    # (Ranking only max(ks)=1 neighbour would give AP@R = 1/3 for the As.)
    metrics = retrieval_metrics(unit([0, 1, 2, 3, 90, 91]), [0, 0, 0, 0, 1, 1], ks=(1,), chunk_size=2)
    assert metrics["map@r"] == 1.0
    # Move point 3 to 88 deg: q3 sees 4 (2 deg), 5 (3), 2 (86), 1, 0 -> B B A: AP@R = (1/3)(1/3) = 1/9.
    # q0: 1 (1), 2 (2), 3 (88) before 4 (90) -> A A A -> 1; q1, q2 likewise. q4: 5 (1) before 3 (2) -> 1; q5 -> 1.
    metrics = retrieval_metrics(unit([0, 1, 2, 88, 90, 91]), [0, 0, 0, 0, 1, 1], ks=(1,), chunk_size=2)
    assert metrics["map@r"] == pytest.approx((5 + 1 / 9) / 6)
    assert metrics["recall@1"] == pytest.approx(5 / 6)


# ---------------------------------------------------------------------------------------------------
# self exclusion, skipping, clipping


def test_self_is_excluded_even_with_exact_duplicates():
    # Items 0 and 1 are the same vector, and so are 2 and 3: each must return its twin, never itself.
    embeddings = unit([0, 0, 90, 90, 180])
    _, indices = topk(embeddings, embeddings, k=10, exclude_self=True, chunk_size=2)
    assert indices.shape == (5, 4)  # k clipped to the 4 other items
    for i, row in enumerate(indices.tolist()):
        assert i not in row
    assert indices[0, 0] == 1 and indices[1, 0] == 0 and indices[2, 0] == 3 and indices[3, 0] == 2
    metrics = retrieval_metrics(embeddings, [7, 7, 8, 8, 9], ks=(1,))
    assert metrics == {"recall@1": 1.0, "map@r": 1.0, "num_queries": 4, "num_skipped": 1}


def test_singleton_classes_are_skipped_and_counted():
    metrics = retrieval_metrics(unit([0, 10, 15, 30, 40]), ["a", "b", "b", "c", "d"], ks=(1,))
    assert metrics["num_queries"] == 2 and metrics["num_skipped"] == 3
    assert metrics["recall@1"] == 1.0


def test_k_larger_than_references_is_clipped():
    scores, indices = topk(unit([0, 50]), unit([10, 20, 30]), k=10)
    assert scores.shape == indices.shape == (2, 3)
    assert indices.tolist() == [[0, 1, 2], [2, 1, 0]]
    scores, indices = topk(unit([0]), unit([0]), k=5, exclude_self=True)
    assert scores.shape == indices.shape == (1, 0)


def test_input_types_and_dtypes_give_the_same_result():
    embeddings = random_integer_data(30, 5, seed=8)  # small integers are exact in float16/bfloat16
    labels = torch.randint(0, 6, (30,), generator=torch.Generator().manual_seed(9))
    expected = retrieval_metrics(embeddings, labels, ks=(1, 5))
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        assert retrieval_metrics(embeddings.to(dtype), labels, ks=(1, 5)) == expected
    assert retrieval_metrics(embeddings.numpy(), labels.numpy(), ks=(1, 5)) == expected
    assert retrieval_metrics(embeddings.numpy().astype(np.float16), labels.tolist(), ks=(1, 5)) == expected
    assert retrieval_metrics(embeddings, [f"class-{c}" for c in labels.tolist()], ks=(1, 5)) == expected


def test_labels_to_codes():
    assert labels_to_codes(["b", "a", "b", "c"]).tolist() == [1, 0, 1, 2]
    assert labels_to_codes(torch.tensor([10, -3, 10])).tolist() == [1, 0, 1]
    assert labels_to_codes(np.array([5, 5, 2])).dtype == torch.int64


def test_progress_bar_runs():
    metrics = retrieval_metrics(unit(ANGLES), LABELS, ks=(1, 3, 10), chunk_size=2, progress=True)
    assert metrics == pytest.approx(ALL_VS_ALL_EXPECTED)
    _, indices = topk(unit(ANGLES), unit(ANGLES), 2, chunk_size=4, progress=True)
    assert indices.shape == (6, 2)


def test_similarity_matrix_is_never_built_whole(monkeypatch):
    shapes = []
    real_mm = torch.mm

    def spy(a, b, **kwargs):
        shapes.append((a.shape[0], b.shape[1]))
        return real_mm(a, b, **kwargs)

    monkeypatch.setattr(torch, "mm", spy)
    embeddings = random_integer_data(50, 4, seed=2)
    retrieval_metrics(embeddings, torch.arange(50) % 10, ks=(1,), chunk_size=8)
    topk(embeddings, embeddings, 3, chunk_size=8)
    assert shapes and all(rows <= 8 and cols == 50 for rows, cols in shapes)


# ---------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: topk(torch.zeros(3, 4), torch.zeros(5, 8), 1), "queries has dimension 4 but references has"),
        (lambda: topk(torch.zeros(4), torch.zeros(5, 4), 1), "queries must be 2-D"),
        (lambda: topk(torch.zeros(3, 4), torch.zeros(5, 4), 0), "k must be a positive integer"),
        (lambda: topk(torch.zeros(3, 4), torch.zeros(5, 4), 1, chunk_size=0), "chunk_size must be"),
        (lambda: topk(torch.zeros(3, 4), torch.zeros(5, 4), 1, exclude_self=True), "3 queries and 5 refe"),
        (lambda: topk([[1.0]], torch.zeros(5, 1), 1), "queries must be a torch.Tensor or numpy array"),
        (
            lambda: topk(torch.tensor([[1.0], [math.nan]]), torch.zeros(5, 1), 1),
            "queries contains NaN or infinite values (first in row 1)",
        ),
        (
            lambda: retrieval_metrics(torch.zeros(3, 4), [0, 1]),
            "query_embeddings has 3 rows but query_labels has 2 labels",
        ),
        (
            lambda: retrieval_metrics(torch.zeros(3, 4), [0, 1, 1], torch.zeros(2, 4), [0, 1, 1]),
            "reference_embeddings has 2 rows but reference_labels has 3 labels",
        ),
        (
            lambda: retrieval_metrics(torch.zeros(3, 4), [0, 1, 1], torch.zeros(2, 5), [0, 1]),
            "query_embeddings has dimension 4 but reference_embeddings has dimension 5",
        ),
        (
            lambda: retrieval_metrics(torch.zeros(2, 4), [0, 1], torch.zeros(2, 4)),
            "reference_embeddings was given without reference_labels",
        ),
        (
            lambda: retrieval_metrics(torch.zeros(2, 4), [0, 1], reference_labels=[0, 1]),
            "reference_labels was given without reference_embeddings",
        ),
        (lambda: retrieval_metrics(torch.zeros(2, 4), [0, 0], ks=()), "ks is empty"),
        (lambda: retrieval_metrics(torch.zeros(2, 4), [0, 0], ks=(1, 0)), "every K in ks must be a positive"),
        (lambda: retrieval_metrics(torch.zeros(2, 4), [0, 1]), "every class has a single item"),
        (
            lambda: retrieval_metrics(torch.zeros(2, 4), [0, 1], torch.zeros(2, 4), [2, 3]),
            "no query label occurs among the references",
        ),
        (
            lambda: retrieval_metrics(torch.zeros(2, 4), [0, "a"]),
            "all ints or all strings, got a mix of int, str",
        ),
        (
            lambda: retrieval_metrics(torch.zeros(2, 4), torch.tensor([0.0, 1.0])),
            "integers or strings, got a",
        ),
        (
            lambda: retrieval_metrics(torch.zeros(2, 4), [0, 1], torch.zeros(2, 4), ["a", "b"]),
            "query_labels are integers but reference_labels are strings",
        ),
    ],
)
def test_errors_name_what_is_wrong(call, message):
    with pytest.raises(VembedError) as error:
        call()
    assert message in str(error.value)


@pytest.mark.parametrize("shortlist", [1, 3, 1000])
def test_recall_counted_beyond_the_shortlist_equals_brute_force(monkeypatch, shortlist):
    """Recall@K read off the shortlist, or counted for queries whose first match ranks below it."""
    from vembed.evaluation import retrieval

    monkeypatch.setattr(retrieval, "_SHORTLIST", shortlist)
    embeddings = random_integer_data(150, 5, seed=3)  # many exactly tied scores
    labels = torch.randint(0, 25, (150,), generator=torch.Generator().manual_seed(8))
    ks = (1, 2, 5, 20, 100)
    expected = brute_force_metrics(embeddings, labels, ks=ks)
    metrics = retrieval_metrics(embeddings, labels, ks=ks, chunk_size=16)
    assert {key: metrics[key] for key in expected} == pytest.approx(expected)
    queries = random_integer_data(40, 5, seed=9)
    query_labels = torch.randint(0, 25, (40,), generator=torch.Generator().manual_seed(10))
    expected = brute_force_metrics(queries, query_labels, embeddings, labels, ks=ks)
    metrics = retrieval_metrics(queries, query_labels, embeddings, labels, ks=ks, chunk_size=16)
    assert {key: metrics[key] for key in expected} == pytest.approx(expected)


def test_ranking_device_is_the_models_gpu_only():
    from types import SimpleNamespace

    from vembed.neighbours import ranking_device

    assert ranking_device(SimpleNamespace(device=torch.device("cpu"))) is None
    assert ranking_device(SimpleNamespace(device=torch.device("cuda", 1))) == torch.device("cuda", 1)
    embeddings = random_integer_data(40, 5, seed=2)
    labels = torch.randint(0, 8, (40,), generator=torch.Generator().manual_seed(3))
    on_cpu = retrieval_metrics(embeddings, labels, ks=(1, 5), device="cpu")
    assert on_cpu == retrieval_metrics(embeddings, labels, ks=(1, 5))


def test_a_non_exhaustive_source_gives_recall_from_its_lists_only():
    """The metric loop fed by a source that ranks only a shortlist (a faiss index): -1 is no neighbour
    (not the last reference), Recall@K is read off the lists, MAP@R is not reported."""
    from vembed.evaluation.retrieval import ranked_metrics

    class Lists:
        exhaustive = False
        lists = torch.tensor([[-1, -1], [2, 0], [0, 1], [1, 0]])

        def plan(self, used, chunk_size):
            return [(0, len(used))]

        def shortlist(self, rows, k):
            return self.lists[rows]

    codes = torch.tensor([0, 1, 1, 0])  # reference 3 is of query 0's class: -1 must not count as it
    metrics = ranked_metrics(Lists(), codes, codes, all_vs_all=True, ks=(1, 2))
    assert metrics == {"recall@1": 0.25, "recall@2": 0.75, "num_queries": 4, "num_skipped": 0}
