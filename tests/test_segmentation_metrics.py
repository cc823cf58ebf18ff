"""Segmentation metrics against a confusion matrix worked out by hand."""

from __future__ import annotations

import pytest
import torch

from vembed.tasks.segmentation.metrics import ConfusionMatrix, segmentation_metrics


def test_miou_matches_a_hand_computed_case_with_ignore_and_an_absent_class():
    # 4 classes; class 3 appears in neither ground truth nor prediction; 255 pixels are ignored.
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 3, 1]])  # predictions under 255 do not count
    cm = ConfusionMatrix(4)
    cm.update(pred, target)
    # rows = truth, cols = prediction (ignored pixels dropped):
    # truth 0: pred 0, 1      truth 1: pred 1, 1      truth 2: pred 2, 0
    expected = torch.tensor([[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    assert torch.equal(cm.matrix, expected)
    m = cm.metrics(["bg", "a", "b", "absent"])
    # IoU0 = 1 / (2 + 2 - 1) = 1/3; IoU1 = 2 / (3 + 2 - 2) = 2/3; IoU2 = 1 / (1 + 2 - 1) = 1/2
    assert m.per_class_iou["bg"] == pytest.approx(1 / 3)
    assert m.per_class_iou["a"] == pytest.approx(2 / 3)
    assert m.per_class_iou["b"] == pytest.approx(1 / 2)
    assert m.per_class_iou["absent"] is None  # left out of the mean
    assert m.miou == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert m.pixel_accuracy == pytest.approx(4 / 6)
    assert m.pixels == 6


def test_one_matrix_over_the_split_is_not_a_mean_of_per_image_scores():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 0, 1]))  # image 1
    cm.update(torch.tensor([1]), torch.tensor([1]))  # image 2
    m = cm.metrics()
    # summed matrix [[3, 0], [1, 1]]: IoU0 = 3/4, IoU1 = 1/2
    assert m.miou == pytest.approx((0.75 + 0.5) / 2)
    assert segmentation_metrics(cm.matrix).to_json()["per_class_iou"] == {"0": 0.75, "1": 0.5}


def test_a_class_only_predicted_counts_with_iou_zero():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 2]), torch.tensor([0, 0]))
    m = cm.metrics()
    assert m.per_class_iou == {"0": 0.5, "1": None, "2": 0.0}
    assert m.miou == pytest.approx(0.25)


def test_target_beyond_the_class_count_is_an_error():
    with pytest.raises(ValueError, match="class 5 but there are 3 classes"):
        ConfusionMatrix(3).update(torch.tensor([0]), torch.tensor([5]))
