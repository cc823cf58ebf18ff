"""Seeded, deterministic splits: stratified by class, whole classes held out, k-shot support/query.

Every random choice uses its own ``random.Random`` seeded from ``(seed, purpose, class)``, so the
same seed gives the same split on any machine and Python version, and adding a class does not
reshuffle the others. Records keep their input order inside each split.
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from vembed.data.prepare.problems import ProblemLog
from vembed.data.records import ImageRecord, Label
from vembed.errors import VembedError

SPLITS = ("train", "val", "test")


def seeded(seed: int, *purpose: object) -> random.Random:
    """A generator for one purpose (string seeds are hashed with SHA-512: stable everywhere)."""
    return random.Random(":".join(str(p) for p in (seed, *purpose)))


def label_key(label: Label | None) -> tuple:
    """Sort key for labels that may mix integers and strings."""
    return (0, label, "") if isinstance(label, int) else (1, 0, str(label))


def group_by_label(records: Sequence[ImageRecord]) -> dict[Label, list[int]]:
    """Label → indices of its records, classes in order of first appearance."""
    groups: dict[Label, list[int]] = {}
    for i, rec in enumerate(records):
        groups.setdefault(rec.label, []).append(i)
    return groups


@dataclass(frozen=True)
class SplitOptions:
    """How :func:`make_splits` splits a labelled set (the ``--seed``/``--*-ratio``/``--shots`` options)."""

    seed: int = 0
    val_ratio: float = 0.1
    test_ratio: float = 0.1
    holdout_ratio: float = 0.0
    shots: int = 0

    def check(self) -> None:
        """Refuse ratios outside [0, 1) or summing to 1+, and negative shots."""
        check_ratios(val_ratio=self.val_ratio, test_ratio=self.test_ratio)
        if self.shots < 0:
            raise VembedError(f"--shots must be 0 (no k-shot files) or more, got {self.shots}")


def check_ratios(**ratios: float) -> None:
    for name, value in ratios.items():
        if not 0 <= value < 1:
            raise VembedError(f"--{name.replace('_', '-')} must be in [0, 1), got {value}")
    if sum(ratios.values()) >= 1:
        listed = " + ".join(f"{name.replace('_', '-')} {value}" for name, value in ratios.items())
        raise VembedError(f"{listed} must leave some images for training (sum below 1)")


def split_by_ratio(
    records: Sequence[ImageRecord], *, val_ratio: float, test_ratio: float, seed: int
) -> dict[str, list[ImageRecord]]:
    """Stratified train/val/test split of the images of every class.

    Each class gives about ``val_ratio`` of its images to val and ``test_ratio`` to test (totals
    are exact up to rounding, spread by largest remainder), always keeps one image for train, and
    never leaves a lone image of a class in val or test when it can be avoided: a lone image cannot
    be a retrieval query. Classes with a single image stay in train.
    """
    check_ratios(val_ratio=val_ratio, test_ratio=test_ratio)
    groups = group_by_label(records)
    sizes = {label: len(idx) for label, idx in groups.items() if len(idx) >= 2}
    room = {label: n - 1 for label, n in sizes.items()}  # one image always stays in train
    counts: dict[str, dict[Label, int]] = {}
    for name, ratio in (("test", test_ratio), ("val", val_ratio)):
        quotas = {label: n * ratio for label, n in sizes.items()}
        counts[name] = _allocate(quotas, room, seeded(seed, "allocate", name))
        _avoid_lone_images(counts[name], room, seeded(seed, "pairs", name))
        for label, n in counts[name].items():
            room[label] -= n
    assignment: dict[int, str] = {}
    for label, idx in groups.items():
        order = list(idx)
        seeded(seed, "split", label).shuffle(order)
        n_test = counts["test"].get(label, 0)
        n_val = counts["val"].get(label, 0)
        for pos, i in enumerate(order):
            assignment[i] = "test" if pos < n_test else "val" if pos < n_test + n_val else "train"
    out: dict[str, list[ImageRecord]] = {name: [] for name in SPLITS}
    for i, rec in enumerate(records):
        out[assignment[i]].append(rec)
    return out


def hold_out_classes(
    records: Sequence[ImageRecord], *, ratio: float, seed: int, by_category: bool = True
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Split whole classes: ``(kept, held_out)`` with about ``ratio`` of the classes held out.

    Only classes with at least two images are held out (a lone image can't be a query). With
    ``by_category`` and records carrying a ``category``, every category gives its share of classes,
    so a held-out split covers the same super-categories as training.
    """
    if not 0 <= ratio < 1:
        raise VembedError(f"class holdout ratio must be in [0, 1), got {ratio}")
    if ratio == 0:
        return list(records), []
    groups = group_by_label(records)
    eligible = sorted((label for label, idx in groups.items() if len(idx) >= 2), key=label_key)
    target = max(1, round(len(eligible) * ratio))
    if len(eligible) < 2 or target >= len(groups):
        raise VembedError(
            f"cannot hold out {ratio:.0%} of {len(groups)} classes ({len(eligible)} with 2+ images): "
            "too few classes"
        )
    category = {records[idx[0]].label: records[idx[0]].category for idx in groups.values()}
    buckets: dict[str | None, list[Label]] = {}
    for label in eligible:
        buckets.setdefault(category[label] if by_category else None, []).append(label)
    sizes = {cat: len(labels) for cat, labels in buckets.items()}
    quotas = {cat: n * target / len(eligible) for cat, n in sizes.items()}
    per_bucket = _allocate(quotas, sizes, seeded(seed, "holdout-categories"))
    held: set[Label] = set()
    for cat, labels in buckets.items():
        labels = list(labels)
        seeded(seed, "holdout", cat).shuffle(labels)
        held.update(labels[: per_bucket.get(cat, 0)])
    kept = [rec for rec in records if rec.label not in held]
    out = [rec for rec in records if rec.label in held]
    return kept, out


def support_query(
    records: Sequence[ImageRecord], *, shots: int, seed: int, log: ProblemLog, name: str
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """k-shot files: ``shots`` images per class as support, the rest of the class as query.

    The support images of a class are in a seeded order, so its first ``k`` lines are the k-shot
    support for any ``k <= shots`` and the query set is the same for every ``k``. A class with
    ``shots`` images or fewer keeps at least one query (logged); one with a single image is left out.
    """
    if shots < 1:
        raise VembedError(f"--shots must be at least 1, got {shots}")
    support: list[ImageRecord] = []
    query_idx: set[int] = set()
    for label, idx in group_by_label(records).items():
        if len(idx) < 2:
            log.add("small-class", f"{name} class {label}", "a single image: left out of support and query")
            continue
        order = list(idx)
        seeded(seed, "support", label).shuffle(order)
        k = min(shots, len(idx) - 1)
        if k < shots:
            log.add(
                "small-class",
                f"{name} class {label}",
                f"{len(idx)} images: {k} support (not {shots}) and 1 query",
            )
        support.extend(records[i] for i in order[:k])
        query_idx.update(order[k:])
    query = [rec for i, rec in enumerate(records) if i in query_idx]
    return support, query


def _allocate(quotas: dict[Hashable, float], caps: dict[Hashable, int], rng: random.Random) -> dict:
    """Integers close to ``quotas`` summing to ``round(sum(quotas))``, each within ``caps``.

    Floors first, then one more to the largest remainders (ties in seeded order).
    """
    counts = {key: min(math.floor(q + 1e-9), caps[key]) for key, q in quotas.items()}
    leftover = round(sum(quotas.values())) - sum(counts.values())
    keys = list(quotas)
    rng.shuffle(keys)
    keys.sort(key=lambda k: quotas[k] - math.floor(quotas[k] + 1e-9), reverse=True)
    for key in keys:
        if leftover <= 0:
            break
        if counts[key] < caps[key]:
            counts[key] += 1
            leftover -= 1
    return {key: n for key, n in counts.items() if n}


def _avoid_lone_images(counts: dict, room: dict, rng: random.Random) -> None:
    """Turn pairs of classes with one image in a split into one class with two (same total)."""
    lone = [label for label, n in counts.items() if n == 1]
    rng.shuffle(lone)
    lone.sort(key=lambda label: room[label] >= 2, reverse=True)  # classes that can take two first
    while len(lone) >= 2 and room[lone[0]] >= 2:
        keep, drop = lone.pop(0), lone.pop()
        counts[keep] = 2
        del counts[drop]


def make_splits(
    records: Sequence[ImageRecord],
    options: SplitOptions,
    *,
    log: ProblemLog,
    predefined: dict[str, list[ImageRecord]] | None = None,
) -> dict[str, list[ImageRecord]]:
    """The splits of a labelled data set, in the order they are written.

    ``train``/``val``/``test`` (the seen classes): ``predefined`` ones (e.g. from ``train/``,
    ``val/``, ``test/`` folders or a ``split`` column) are kept, and a missing val or test is carved
    from train by stratified ratio; without ``predefined`` all three come from :func:`split_by_ratio`.
    A split whose ratio is 0 (and that is not predefined) is not produced. ``holdout_ratio`` > 0
    adds ``unseen`` (whole classes, removed from every other split); ``shots`` > 0 adds
    ``seen_support``/``seen_query`` (from test) and ``unseen_support``/``unseen_query``.
    """
    options.check()
    seed, val_ratio, test_ratio = options.seed, options.val_ratio, options.test_ratio
    holdout_ratio, shots = options.holdout_ratio, options.shots
    seen, unseen = hold_out_classes(records, ratio=holdout_ratio, seed=seed, by_category=True)
    held = {rec.label for rec in unseen}
    if predefined is None:
        splits = split_by_ratio(seen, val_ratio=val_ratio, test_ratio=test_ratio, seed=seed)
        wanted = {"train", *(["val"] if val_ratio > 0 else []), *(["test"] if test_ratio > 0 else [])}
    else:
        given = {name: [r for r in recs if r.label not in held] for name, recs in predefined.items()}
        if "train" not in given:
            raise VembedError("predefined splits must include train")
        carve = {
            name: ratio for name, ratio in (("val", val_ratio), ("test", test_ratio)) if name not in given
        }
        carved = split_by_ratio(
            given["train"], val_ratio=carve.get("val", 0.0), test_ratio=carve.get("test", 0.0), seed=seed
        )
        splits = {
            "train": carved["train"],
            **{name: given.get(name, carved[name]) for name in ("val", "test")},
        }
        wanted = {"train", *given, *(name for name, ratio in carve.items() if ratio > 0)}
    out = {name: splits[name] for name in SPLITS if name in wanted}
    if holdout_ratio > 0:
        out["unseen"] = unseen
    if shots:
        if out.get("test"):
            out["seen_support"], out["seen_query"] = support_query(
                out["test"], shots=shots, seed=seed, log=log, name="seen test"
            )
        else:
            log.add("empty-split", "seen_support", "no test split to draw k-shot support/query from")
        if holdout_ratio > 0:
            out["unseen_support"], out["unseen_query"] = support_query(
                unseen, shots=shots, seed=seed, log=log, name="unseen"
            )
    return out
