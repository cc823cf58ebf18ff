"""The splitters behind `vembed prepare`: stratification, class holdout, k-shot files, determinism."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from vembed.data.prepare.problems import ProblemLog
from vembed.data.prepare.splits import (
    SplitOptions,
    hold_out_classes,
    make_splits,
    split_by_ratio,
    support_query,
)
from vembed.data.records import ImageRecord
from vembed.errors import VembedError


def records(sizes: dict, categories: dict | None = None) -> list[ImageRecord]:
    """``{label: n_images}`` → records (paths need not exist: the splitters never open them)."""
    out = []
    for label, n in sizes.items():
        cat = (categories or {}).get(label)
        out += [ImageRecord(Path(f"/img/{label}/{i}.jpg"), label, cat, f"x:{label}:{i}") for i in range(n)]
    return out


def per_class(recs) -> Counter:
    return Counter(r.label for r in recs)


def test_ratio_split_is_stratified_and_exact():
    recs = records({c: 20 for c in range(10)})
    splits = split_by_ratio(recs, val_ratio=0.1, test_ratio=0.2, seed=0)
    assert per_class(splits["val"]) == {c: 2 for c in range(10)}
    assert per_class(splits["test"]) == {c: 4 for c in range(10)}
    assert per_class(splits["train"]) == {c: 14 for c in range(10)}
    paths = [r.image for s in splits.values() for r in s]
    assert sorted(paths) == sorted(r.image for r in recs)  # a partition: nothing lost or repeated


def test_ratio_split_totals_follow_ratios_with_uneven_classes():
    sizes = {c: 5 + 3 * c for c in range(12)}
    recs = records(sizes)
    splits = split_by_ratio(recs, val_ratio=0.15, test_ratio=0.25, seed=3)
    total = len(recs)
    assert len(splits["test"]) == round(total * 0.25)
    assert abs(len(splits["val"]) - round(total * 0.15)) <= 1
    for label, n in sizes.items():  # each class stays close to its share
        assert abs(per_class(splits["test"])[label] - n * 0.25) <= 1.5
        assert per_class(splits["train"])[label] >= 1


def test_ratio_split_never_leaves_a_lone_image_in_val_or_test():
    # 10 images × 0.1 = one val image per class: useless as a retrieval query, so pairs are formed
    splits = split_by_ratio(records({c: 10 for c in range(6)}), val_ratio=0.1, test_ratio=0.1, seed=0)
    for name in ("val", "test"):
        counts = per_class(splits[name])
        assert sum(counts.values()) == 6
        assert set(counts.values()) == {2}


def test_single_image_classes_stay_in_train():
    splits = split_by_ratio(records({"a": 1, "b": 30}), val_ratio=0.3, test_ratio=0.3, seed=0)
    assert per_class(splits["train"])["a"] == 1
    assert "a" not in per_class(splits["val"]) and "a" not in per_class(splits["test"])


def test_same_seed_same_split_other_seed_differs():
    recs = records({c: 12 for c in range(8)})
    a = split_by_ratio(recs, val_ratio=0.2, test_ratio=0.2, seed=7)
    b = split_by_ratio(recs, val_ratio=0.2, test_ratio=0.2, seed=7)
    c = split_by_ratio(recs, val_ratio=0.2, test_ratio=0.2, seed=8)
    assert a == b
    assert a["test"] != c["test"]


def test_adding_a_class_does_not_reshuffle_the_others():
    base = records({c: 10 for c in range(4)})
    more = base + records({99: 10})
    a = split_by_ratio(base, val_ratio=0.2, test_ratio=0.2, seed=1)
    b = split_by_ratio(more, val_ratio=0.2, test_ratio=0.2, seed=1)
    assert [r for r in b["test"] if r.label != 99] == a["test"]


def test_bad_ratios_are_errors():
    with pytest.raises(VembedError, match="val-ratio"):
        split_by_ratio(records({0: 5}), val_ratio=1.5, test_ratio=0.1, seed=0)
    with pytest.raises(VembedError, match="sum below 1"):
        split_by_ratio(records({0: 5}), val_ratio=0.5, test_ratio=0.5, seed=0)


def test_holdout_is_class_disjoint_and_category_balanced():
    cats = {c: ["bicycle", "chair", "mug"][c % 3] for c in range(30)}
    recs = records({c: 3 for c in range(30)}, cats)
    kept, held = hold_out_classes(recs, ratio=0.2, seed=0)
    assert not set(per_class(kept)) & set(per_class(held))
    assert len(per_class(held)) == 6
    assert Counter(cats[c] for c in per_class(held)) == {"bicycle": 2, "chair": 2, "mug": 2}
    assert len(kept) + len(held) == len(recs)


def test_holdout_picks_only_classes_with_two_images_and_is_seeded():
    recs = records({**{c: 1 for c in range(10)}, **{c: 4 for c in range(10, 20)}})
    kept, held = hold_out_classes(recs, ratio=0.25, seed=5)
    assert all(label >= 10 for label in per_class(held))
    assert hold_out_classes(recs, ratio=0.25, seed=5) == (kept, held)
    assert hold_out_classes(recs, ratio=0.25, seed=6)[1] != held


def test_holdout_of_too_few_classes_is_an_error():
    with pytest.raises(VembedError, match="too few classes"):
        hold_out_classes(records({0: 3}), ratio=0.5, seed=0)


def test_support_query_first_k_lines_are_the_k_shot_support():
    recs = records({c: 12 for c in range(4)})
    log = ProblemLog()
    s5, q5 = support_query(recs, shots=5, seed=0, log=log, name="test")
    s3, _ = support_query(recs, shots=3, seed=0, log=log, name="test")
    assert per_class(s5) == {c: 5 for c in range(4)}
    assert per_class(q5) == {c: 7 for c in range(4)}
    assert not {r.image for r in s5} & {r.image for r in q5}
    for c in range(4):
        assert [r for r in s5 if r.label == c][:3] == [r for r in s3 if r.label == c]
    assert not len(log)


def test_support_query_small_classes_keep_a_query_and_are_reported():
    log = ProblemLog()
    support, query = support_query(records({"a": 3, "b": 1, "c": 9}), shots=5, seed=0, log=log, name="unseen")
    assert per_class(support) == {"a": 2, "c": 5}
    assert per_class(query) == {"a": 1, "c": 4}
    assert [p.kind for p in log] == ["small-class", "small-class"]
    assert "unseen class a" in str(log.items[0]) and "unseen class b" in str(log.items[1])


def test_make_splits_with_holdout_and_shots():
    recs = records({c: 20 for c in range(10)})
    log = ProblemLog()
    options = SplitOptions(seed=0, val_ratio=0.1, test_ratio=0.3, holdout_ratio=0.2, shots=2)
    splits = make_splits(recs, options, log=log)
    assert list(splits) == [
        "train",
        "val",
        "test",
        "unseen",
        "seen_support",
        "seen_query",
        "unseen_support",
        "unseen_query",
    ]
    unseen = set(per_class(splits["unseen"]))
    assert len(unseen) == 2
    for name in ("train", "val", "test", "seen_support", "seen_query"):
        assert not set(per_class(splits[name])) & unseen
    assert set(per_class(splits["unseen_support"])) == unseen


def test_make_splits_keeps_predefined_and_carves_only_what_is_missing():
    train = records({c: 10 for c in range(4)})
    test = [ImageRecord(Path(f"/t/{c}/{i}.jpg"), c, None, "t") for c in range(4) for i in range(3)]
    log = ProblemLog()
    splits = make_splits(
        train + test,
        SplitOptions(seed=0, val_ratio=0.2, test_ratio=0.5),
        log=log,
        predefined={"train": train, "test": test},
    )
    assert splits["test"] == test  # kept as given; test_ratio unused
    assert per_class(splits["val"]) == {c: 2 for c in range(4)}  # carved from train
    assert len(splits["train"]) == 40 - 8


def test_make_splits_zero_ratio_means_no_split():
    splits = make_splits(
        records({c: 10 for c in range(3)}),
        SplitOptions(seed=0, val_ratio=0, test_ratio=0.2),
        log=ProblemLog(),
    )
    assert list(splits) == ["train", "test"]
