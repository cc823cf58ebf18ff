"""PKBatchSampler: batch structure, category limits, determinism, replicas, exclusions, validation."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from vembed.data.samplers import PKBatchSampler
from vembed.errors import VembedError


def make_labels(num_classes: int = 40, seed: int = 0, low: int = 2, high: int = 12) -> np.ndarray:
    """Shuffled labels with a varying number of images per class (ids not contiguous)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(low, high + 1, size=num_classes)
    labels = np.repeat(np.arange(num_classes) * 7 + 3, sizes)
    return labels[rng.permutation(labels.size)]


def check_pk(batch: list[int], labels: np.ndarray, P: int, K: int) -> Counter:
    assert len(batch) == P * K
    counts = Counter(labels[batch].tolist())
    assert len(counts) == P and set(counts.values()) == {K}, counts
    return counts


@pytest.mark.parametrize("P,K", [(4, 2), (5, 4), (8, 3), (1, 6)])
def test_every_batch_is_p_classes_times_k(P, K):
    labels = make_labels()
    sampler = PKBatchSampler(labels, P, K, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) > 0
    for batch in batches:
        check_pk(batch, labels, P, K)
        assert all(0 <= i < len(labels) for i in batch)
        members = Counter(batch)
        for label in set(labels[batch].tolist()):  # without replacement when the class has >= K images
            idx = [i for i in batch if labels[i] == label]
            if (labels == label).sum() >= K:
                assert all(members[i] == 1 for i in idx)


def test_small_classes_are_drawn_with_replacement():
    labels = np.array([0, 0, 1, 1, 2, 2, 2, 2, 2, 2])  # classes 0 and 1 have 2 images, K = 4
    sampler = PKBatchSampler(labels, 2, 4, seed=0)
    seen = Counter()
    for epoch in range(5):
        sampler.set_epoch(epoch)
        for batch in sampler:
            counts = check_pk(batch, labels, 2, 4)
            seen.update(counts)
            for label in (0, 1):
                if label in counts:  # both images of a 2-image class appear, each at least once
                    assert {i for i in batch if labels[i] == label} == set(np.nonzero(labels == label)[0])
    assert seen[0] > 0 and seen[1] > 0


def test_epoch_visits_roughly_every_image_once():
    labels = make_labels(num_classes=60, low=4, high=20)
    P, K = 6, 4
    sampler = PKBatchSampler(labels, P, K, seed=1)
    # round(n / K) groups per class, P groups per batch
    groups = sum(max(1, (n + K // 2) // K) for n in Counter(labels.tolist()).values())
    assert len(sampler) == groups // P
    assert abs(len(sampler) * P * K - len(labels)) <= 0.15 * len(labels)
    visits = Counter(i for batch in sampler for i in batch)
    assert len(visits) >= 0.8 * len(labels)  # most images seen ...
    assert max(visits.values()) <= 3  # ... and none over-sampled


def test_large_classes_drain_through_the_epoch():
    # One class of 40 images (20 groups of K=2) among 20 classes of 2: 40 groups, 20 batches of P=2.
    # Drawing classes in proportion to their groups left puts the big class in almost every batch;
    # drawing them uniformly would leave most of its groups for the end, where they no longer fit.
    labels = np.concatenate([np.zeros(40, dtype=np.int64), np.repeat(np.arange(1, 21), 2)])
    for seed in range(5):
        sampler = PKBatchSampler(labels, 2, 2, seed=seed)
        batches = list(sampler)
        assert len(batches) == 20
        big = {i for batch in batches for i in batch if labels[i] == 0}
        assert len(big) >= 30, (seed, len(big))
        for batch in batches:  # every class has >= K images: never a repeated index, top-ups included
            check_pk(batch, labels, 2, 2)
            assert len(set(batch)) == len(batch)


def test_singleton_classes_are_excluded_and_counted():
    labels = np.array([0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 5])  # classes 1, 3, 5 have one image
    sampler = PKBatchSampler(labels, 2, 2, seed=0)
    assert sampler.num_excluded_classes == 3
    assert sampler.num_excluded_samples == 3
    assert sampler.num_classes == 3
    for epoch in range(4):
        sampler.set_epoch(epoch)
        for batch in sampler:
            assert not set(labels[batch].tolist()) & {1, 3, 5}


def test_categories_limit_each_batch():
    rng = np.random.default_rng(0)
    labels = make_labels(num_classes=80, seed=1)
    category_of_class = {label: int(rng.integers(0, 6)) for label in set(labels.tolist())}
    categories = np.array([category_of_class[label] for label in labels.tolist()])
    for C in (1, 2, 3):
        sampler = PKBatchSampler(labels, 6, 2, categories=categories, categories_per_batch=C, seed=2)
        used = Counter()
        for batch in sampler:
            check_pk(batch, labels, 6, 2)
            batch_categories = set(categories[batch].tolist())
            assert len(batch_categories) <= C
            used.update(batch_categories)
        assert len(used) == 6  # every category gets batches
    unrestricted = PKBatchSampler(labels, 6, 2, seed=2)
    assert max(len(set(categories[b].tolist())) for b in unrestricted) > 3


def test_categories_validation():
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    with pytest.raises(VembedError, match="class 1 spans several categories"):
        PKBatchSampler(labels, 2, 2, categories=[0, 0, 0, 1, 1, 1, 1, 1], categories_per_batch=1)
    with pytest.raises(VembedError, match="categories has 3 values for 8 labels"):
        PKBatchSampler(labels, 2, 2, categories=[0, 1, 2], categories_per_batch=1)
    with pytest.raises(VembedError, match="no categories were given"):
        PKBatchSampler(labels, 2, 2, categories_per_batch=1)
    with pytest.raises(VembedError, match="cannot exceed classes_per_batch"):
        PKBatchSampler(labels, 2, 2, categories=[0] * 8, categories_per_batch=3)
    # two categories of 2 classes each: P = 3 from C = 1 category is impossible
    cats = [0, 0, 0, 0, 1, 1, 1, 1]
    with pytest.raises(VembedError, match="only 0 categories"):
        PKBatchSampler(labels, 3, 2, categories=cats, categories_per_batch=1)
    PKBatchSampler(labels, 3, 2, categories=cats, categories_per_batch=2)  # 2 + 1 classes: fine


def test_small_categories_are_excluded_and_counted():
    labels = np.repeat(np.arange(7), 3)
    categories = np.repeat([0, 0, 0, 1, 1, 1, 2], 3)  # category 2 has one class, P / C = 2 needed
    sampler = PKBatchSampler(labels, 4, 2, categories=categories, categories_per_batch=2, seed=0)
    assert sampler.num_excluded_categories == 1
    assert all(6 not in labels[b] for b in sampler)


def test_deterministic_given_seed_and_epoch():
    labels = make_labels()
    a = PKBatchSampler(labels, 4, 3, seed=7)
    b = PKBatchSampler(labels.tolist(), 4, 3, seed=7)
    a.set_epoch(2)
    b.set_epoch(2)
    first = list(a)
    assert first == list(a) == list(b)  # pure function of (seed, epoch): same batches, same order
    a.set_epoch(3)
    assert list(a) != first
    c = PKBatchSampler(labels, 4, 3, seed=8)
    c.set_epoch(2)
    assert list(c) != first
    # resuming mid-epoch = skipping the first n batches of a fresh iteration
    b.set_epoch(2)
    iterator = iter(b)
    for _ in range(5):
        next(iterator)
    assert list(iterator) == first[5:]


def test_accepts_tensor_labels_and_works_with_dataloader():
    labels = torch.as_tensor(make_labels())
    sampler = PKBatchSampler(labels, 4, 2, seed=0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(labels), batch_sampler=sampler)
    batches = [batch for (batch,) in loader]
    assert len(batches) == len(sampler)
    for batch in batches:
        assert sorted(Counter(batch.tolist()).values()) == [2] * 4


@pytest.mark.parametrize("replicas", [2, 3])
def test_replicas_get_disjoint_equal_shares(replicas):
    labels = make_labels(num_classes=50)
    single = PKBatchSampler(labels, 4, 2, seed=5)
    single.set_epoch(1)
    all_batches = [tuple(b) for b in single]
    shares = []
    for rank in range(replicas):
        sampler = PKBatchSampler(labels, 4, 2, seed=5, num_replicas=replicas, rank=rank)
        sampler.set_epoch(1)
        shares.append([tuple(b) for b in sampler])
        assert len(shares[-1]) == len(sampler) == len(all_batches) // replicas
    flat = [b for share in shares for b in share]
    assert len(set(flat)) == len(flat)  # no batch handed to two ranks
    assert set(flat) <= set(all_batches)  # the ranks split the single-process epoch
    for rank, share in enumerate(shares):
        assert share == all_batches[rank : replicas * len(share) : replicas]


def test_argument_validation():
    labels = make_labels(num_classes=5)
    bad = [
        (dict(classes_per_batch=0, samples_per_class=2), "classes_per_batch"),
        (dict(classes_per_batch=2, samples_per_class=1), "samples_per_class"),
        (dict(classes_per_batch=6, samples_per_class=2), "only 5 classes"),
        (
            dict(
                classes_per_batch=2, samples_per_class=2, categories_per_batch=0, categories=[0] * len(labels)
            ),
            "(C)",
        ),
        (dict(classes_per_batch=2, samples_per_class=2, num_replicas=2, rank=2), "rank 2"),
        (dict(classes_per_batch=2, samples_per_class=2, num_replicas=0), "num_replicas"),
        (dict(classes_per_batch=2, samples_per_class=2, seed=-1), "seed"),
        (dict(classes_per_batch=2, samples_per_class=2, num_replicas=1000), "fewer than num_replicas"),
    ]
    for kwargs, message in bad:
        with pytest.raises(VembedError, match=message.replace("(", r"\(").replace(")", r"\)")):
            PKBatchSampler(labels, **kwargs)
    with pytest.raises(VembedError, match="empty"):
        PKBatchSampler([], 1, 2)
    with pytest.raises(VembedError, match="integers"):
        PKBatchSampler([0.5, 0.5, 1.5, 1.5], 1, 2)
    with pytest.raises(VembedError, match="epoch"):
        PKBatchSampler(labels, 2, 2).set_epoch(-1)
