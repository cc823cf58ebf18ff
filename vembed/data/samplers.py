"""Batch samplers for metric learning: P classes x K samples per batch, optionally few categories.

Usage with a DataLoader (the sampler yields whole batches)::

    sampler = PKBatchSampler(labels, classes_per_batch=32, samples_per_class=4, seed=cfg.seed)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=...)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in loader: ...

The batches of an epoch are a pure function of ``(labels, categories, negatives, arguments, seed, epoch)``:
iterating
twice gives the same batches in the same order, so a run resumes mid-epoch by skipping the first n batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from vembed.errors import VembedError

__all__ = ["PKBatchSampler"]


def _check_int(value: object, what: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise VembedError(f"PKBatchSampler: {what} must be an integer >= {low}, got {value!r}")
    return int(value)


def _as_int_array(values: Sequence[int], what: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.ndim != 1:
        raise VembedError(
            f"PKBatchSampler: {what} must be a flat sequence of integers, got shape {array.shape}"
        )
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise VembedError(f"PKBatchSampler: {what} must be integers, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def _weighted_order(rng: np.random.Generator, weights: np.ndarray) -> np.ndarray:
    """A random order of ``range(len(weights))``: items with weight > 0 first, drawn without replacement
    with probability proportional to weight (Efraimidis-Spirakis keys), then zero-weight items uniformly."""
    keys = rng.exponential(size=weights.shape[0])
    positive = weights > 0
    keys[positive] /= weights[positive]
    return np.lexsort((keys, ~positive))


class PKBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Class-balanced batches: ``P = classes_per_batch`` distinct classes x ``K = samples_per_class``.

    Every class in a batch contributes exactly K dataset indices: drawn without replacement when the class
    has at least K images, with replacement otherwise. Classes with a single image cannot form a positive
    pair and are left out (``num_excluded_classes``, ``num_excluded_samples``).

    An epoch visits each image about once: a class with n images gets ``max(1, round(n / K))`` groups of K
    per epoch; groups are dealt into batches so that every class drains at the same rate (classes drawn
    with probability proportional to their groups left). ``len(self) == (total groups // P) //
    num_replicas``. When the groups left at the end of an epoch span fewer than P classes, the batch is
    topped up with fresh groups from other classes.

    With ``categories`` (one super-category id per record, e.g. SOP's 12) and ``categories_per_batch=C``,
    each batch takes its P classes from only C categories (P split as evenly as possible between them):
    negatives from the same super-category are harder. Categories with fewer than ceil(P / C) usable
    classes cannot fill their share and are left out (``num_excluded_categories``). Without
    ``categories_per_batch`` the categories are ignored.

    With ``negatives`` (mined hard negatives of each record, best first: ``vembed mine``) and
    ``hard_negatives=H``, each class a batch draws brings up to H more classes: those of its group's first
    image's (the anchor's) mined negatives, in their order, each as a group of K that holds that negative
    image (taken from the class' groups of the epoch while it has some). Negatives whose class is already
    in the batch, left out, or (with categories) of another category than the share being filled are
    passed over; the batch keeps P distinct classes x K images.

    For distributed training every rank builds the same epoch and takes batches ``rank, rank + R, ...``:
    disjoint shares of equal length (the last ``total % R`` batches are dropped).

    Args:
        labels: class id of each dataset record (any integers).
        classes_per_batch: P >= 1. samples_per_class: K >= 2. The batch size is P * K.
        categories: super-category id of each record (same length as labels; constant within a class).
        categories_per_batch: C >= 1 (and <= P), number of categories per batch.
        seed: base seed; the epoch set with :meth:`set_epoch` is mixed in.
        negatives: per record, the dataset indices of its mined negatives, best first.
        hard_negatives: H >= 1, the negatives' classes each drawn class brings (needs ``negatives``).
        num_replicas, rank: the distributed world size and this process' rank.
    """

    def __init__(
        self,
        labels: Sequence[int],
        classes_per_batch: int,
        samples_per_class: int,
        *,
        categories: Sequence[int] | None = None,
        categories_per_batch: int | None = None,
        negatives: Sequence[Sequence[int]] | None = None,
        hard_negatives: int | None = None,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        self.classes_per_batch = _check_int(classes_per_batch, "classes_per_batch (P)", 1)
        self.samples_per_class = _check_int(samples_per_class, "samples_per_class (K)", 2)
        self.batch_size = self.classes_per_batch * self.samples_per_class
        self.seed = _check_int(seed, "seed", 0)
        self.num_replicas = _check_int(num_replicas, "num_replicas", 1)
        self.rank = _check_int(rank, "rank", 0)
        if self.rank >= self.num_replicas:
            raise VembedError(f"PKBatchSampler: rank {rank} must be < num_replicas {num_replicas}")
        self.epoch = 0

        label_array = _as_int_array(labels, "labels")
        if label_array.size == 0:
            raise VembedError("PKBatchSampler: labels is empty")
        P, K = self.classes_per_batch, self.samples_per_class

        class_ids, first, class_of_record, counts = np.unique(
            label_array, return_index=True, return_inverse=True, return_counts=True
        )
        usable = counts >= 2
        self.num_excluded_classes = int((~usable).sum())
        self.num_excluded_samples = int(counts[~usable].sum())

        # Category of each class (constant within a class), when categories are used.
        self.num_excluded_categories = 0
        if categories_per_batch is None:
            category_of_class = np.zeros(class_ids.shape[0], dtype=np.int64)
            self.categories_per_batch = 1
        else:
            self.categories_per_batch = _check_int(categories_per_batch, "categories_per_batch (C)", 1)
            if categories is None:
                raise VembedError("PKBatchSampler: categories_per_batch is set but no categories were given")
            if self.categories_per_batch > P:
                raise VembedError(
                    f"PKBatchSampler: categories_per_batch ({categories_per_batch}) cannot exceed "
                    f"classes_per_batch ({P}): each category in a batch needs at least one class"
                )
            category_array = _as_int_array(categories, "categories")
            if category_array.shape[0] != label_array.shape[0]:
                raise VembedError(
                    f"PKBatchSampler: categories has {category_array.shape[0]} values for "
                    f"{label_array.shape[0]} labels"
                )
            category_of_class = category_array[first]  # category of each class' first record
            mismatch = np.nonzero(category_array != category_of_class[class_of_record])[0]
            if mismatch.size:
                record = int(mismatch[0])
                raise VembedError(
                    f"PKBatchSampler: class {class_ids[class_of_record[record]]} spans several categories "
                    f"(record {record} has category {category_array[record]}, record "
                    f"{first[class_of_record[record]]} has {category_of_class[class_of_record[record]]})"
                )

        # Categories able to provide their share of a batch: ceil(P / C) usable classes.
        category_ids, category_of_class = np.unique(category_of_class, return_inverse=True)
        share = -(-P // self.categories_per_batch)
        usable_per_category = np.bincount(category_of_class[usable], minlength=category_ids.shape[0])
        eligible_category = usable_per_category >= share
        if categories_per_batch is None:
            eligible_category[:] = True  # one pseudo-category; too few classes is reported below
        else:
            dropped = (~eligible_category) & (usable_per_category > 0)
            self.num_excluded_categories = int(dropped.sum())
            if int(eligible_category.sum()) < self.categories_per_batch:
                raise VembedError(
                    f"PKBatchSampler: only {int(eligible_category.sum())} categories have the "
                    f"{share} classes with >= 2 images needed to fill ceil(P / C) = ceil({P} / "
                    f"{self.categories_per_batch}) slots; need categories_per_batch = "
                    f"{self.categories_per_batch}. Lower categories_per_batch or classes_per_batch."
                )
        kept = usable & eligible_category[category_of_class]
        self.num_classes = int(kept.sum())
        if self.num_classes < P:
            raise VembedError(
                f"PKBatchSampler: classes_per_batch is {P} but only {self.num_classes} classes have at least "
                f"2 images ({self.num_excluded_classes} classes have a single image)"
            )

        # Kept records and dense class ids 0..num_classes-1. Each epoch sorts the records by (class, random
        # key), so that `order[_starts[c] : _starts[c] + _counts[c]]` are class c's records, shuffled.
        kept_classes = np.nonzero(kept)[0]
        record_is_kept = kept[class_of_record]
        self._records = np.nonzero(record_is_kept)[0]  # dataset indices of kept records
        class_of_kept = np.searchsorted(kept_classes, class_of_record[self._records])
        self._class_of_record = class_of_kept  # dense class index 0..num_classes-1 per kept record
        self._counts = counts[kept_classes]
        self._starts = np.concatenate([[0], np.cumsum(self._counts)[:-1]])
        self._category = category_of_class[kept_classes]
        num_categories = category_ids.shape[0]
        self._classes_by_category = [np.nonzero(self._category == c)[0] for c in range(num_categories)]
        self._eligible_categories = np.nonzero(eligible_category)[0]
        self._set_negatives(negatives, hard_negatives, label_array.shape[0])

        # Groups of K per class per epoch: round(n / K), at least one.
        self._groups = np.maximum(1, (self._counts + K // 2) // K)
        self._total_batches = int(self._groups.sum()) // P
        if self._total_batches // self.num_replicas < 1:
            raise VembedError(
                f"PKBatchSampler: the dataset gives {self._total_batches} batches of {P} x {K} per epoch, "
                f"fewer than num_replicas ({self.num_replicas})"
            )

    def _set_negatives(
        self, negatives: Sequence[Sequence[int]] | None, hard_negatives: int | None, size: int
    ) -> None:
        self._size = size
        self._negatives: list[list[int]] | None = None
        self.hard_negatives = None
        if (negatives is None) != (hard_negatives is None):
            raise VembedError(
                "PKBatchSampler: negatives and hard_negatives go together (give both or neither)"
            )
        if negatives is None:
            return
        self.hard_negatives = _check_int(hard_negatives, "hard_negatives", 1)
        # dense class of every dataset index (-1: a record left out)
        self._class_of_index = np.full(size, -1, dtype=np.int64)
        self._class_of_index[self._records] = self._class_of_record
        self.set_negatives(negatives)

    def set_negatives(self, negatives: Sequence[Sequence[int]]) -> None:
        """Replace the mined negatives (re-mining); epochs iterated from now on use them."""
        if self.hard_negatives is None:
            raise VembedError("PKBatchSampler: set_negatives needs hard_negatives")
        if len(negatives) != self._size:
            raise VembedError(
                f"PKBatchSampler: negatives has {len(negatives)} rows for {self._size} records (one per record)"
            )
        rows = []
        for i, row in enumerate(negatives):
            row = _as_int_array(list(row), f"negatives[{i}]")
            if row.size and (row.min() < 0 or row.max() >= self._size):
                raise VembedError(
                    f"PKBatchSampler: negatives[{i}] holds an index outside 0..{self._size - 1}"
                )
            rows.append(row.tolist())
        self._negatives = rows

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches :meth:`__iter__` yields (call before each epoch)."""
        self.epoch = _check_int(epoch, "epoch", 0)

    def __len__(self) -> int:
        return self._total_batches // self.num_replicas

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        # Shuffle within each class: sort kept records by (class, random key).
        order = self._records[np.lexsort((rng.random(self._records.shape[0]), self._class_of_record))]
        groups_left = self._groups.copy()
        used = self.__len__() * self.num_replicas
        for b in range(used):
            batch = self._next_batch(rng, order, groups_left)
            if b % self.num_replicas == self.rank:
                yield batch

    # -- one batch -----------------------------------------------------------------------------------

    def _next_batch(self, rng: np.random.Generator, order: np.ndarray, groups_left: np.ndarray) -> list[int]:
        P, C = self.classes_per_batch, self.categories_per_batch
        eligible = self._eligible_categories
        category_weight = np.array([groups_left[self._classes_by_category[c]].sum() for c in eligible])
        chosen = eligible[_weighted_order(rng, category_weight)[:C]]
        shares = [P // C + (1 if i < P % C else 0) for i in range(C)]
        batch: list[int] = []
        for category, share in zip(chosen, shares, strict=True):
            classes = self._classes_by_category[category]
            ranked = classes[_weighted_order(rng, groups_left[classes])]
            if self._negatives is None:
                for c in ranked[:share]:
                    batch.extend(self._take_group(rng, order, groups_left, int(c)))
                continue
            taken: set[int] = set()
            for c in ranked:
                if len(taken) == share:
                    break
                if int(c) in taken:
                    continue
                group = self._take_group(rng, order, groups_left, int(c))
                batch.extend(group)
                taken.add(int(c))
                batch.extend(self._negative_groups(rng, order, groups_left, group[0], category, share, taken))
        return batch

    def _negative_groups(
        self,
        rng: np.random.Generator,
        order: np.ndarray,
        groups_left: np.ndarray,
        anchor: int,
        category: int,
        share: int,
        taken: set[int],
    ) -> list[int]:
        """Groups of up to ``hard_negatives`` classes of ``anchor``'s mined negatives (added to ``taken``),
        each holding the negative image itself."""
        out: list[int] = []
        added = 0
        for negative in self._negatives[anchor]:
            if added == self.hard_negatives or len(taken) == share:
                break
            c = int(self._class_of_index[negative])
            if c < 0 or c in taken or self._category[c] != category:
                continue
            group = self._take_group(rng, order, groups_left, c)
            if negative in group:
                group.remove(negative)
                group.insert(0, negative)
            else:
                group[0] = negative
            out.extend(group)
            taken.add(c)
            added += 1
        return out

    def _take_group(
        self, rng: np.random.Generator, order: np.ndarray, groups_left: np.ndarray, c: int
    ) -> list[int]:
        """K dataset indices of class ``c``: its next group of the epoch, or a fresh draw when none is left."""
        K = self.samples_per_class
        members = order[self._starts[c] : self._starts[c] + self._counts[c]]
        n = members.shape[0]
        if groups_left[c] == 0:  # top-up: a fresh random group
            if n >= K:
                return members[rng.choice(n, size=K, replace=False)].tolist()
            return np.concatenate([members, members[rng.integers(0, n, size=K - n)]]).tolist()
        j = int(self._groups[c] - groups_left[c])
        groups_left[c] -= 1
        start = j * K
        if start + K <= n:
            return members[start : start + K].tolist()
        rest = members[start:]  # last group short of images: fill from the class' other images
        if start >= K - rest.shape[0]:
            fill = members[:start][rng.choice(start, size=K - rest.shape[0], replace=False)]
        else:  # fewer than K images in the whole class: with replacement
            fill = members[rng.integers(0, n, size=K - rest.shape[0])]
        return np.concatenate([rest, fill]).tolist()
