from PIL import Image

from vembed.training.plot import plot_metrics

ROWS = [
    {"kind": "val", "step": 0, "recall@1": 0.4, "recall@10": 0.8, "map@r": 0.1},
    {"kind": "train", "step": 5, "loss": 3.0, "lr": 1e-3},
    {"kind": "train", "step": 10, "loss": 2.0, "lr": 5e-4},
    {"kind": "val", "step": 10, "recall@1": 0.7, "recall@10": 0.95, "map@r": 0.3},
]


def test_plot_writes_a_png_with_both_panels(tmp_path):
    out = plot_metrics(ROWS, tmp_path / "metrics.png", title="run")
    assert out == tmp_path / "metrics.png"
    img = Image.open(out)
    assert img.format == "PNG" and img.size[0] > 2 * img.size[1] > 0
    assert list(tmp_path.iterdir()) == [out]  # no temp file left behind


def test_nothing_to_draw_writes_nothing(tmp_path):
    assert plot_metrics([{"kind": "other", "step": 1}], tmp_path / "m.png") is None
    assert not (tmp_path / "m.png").exists()


def test_train_rows_only(tmp_path):
    assert plot_metrics(ROWS[1:3], tmp_path / "m.png").is_file()


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_a_classifier_run_draws_its_accuracy_curves_and_marks_the_selected_one():
    from vembed.training.plot import draw_metrics

    rows = [
        {"kind": "train", "step": 5, "loss": 2.0},
        {"kind": "val", "step": 5, "epoch": 1, "top1": 0.5, "top5": 0.9, "num_bad_images": 0},
        {"kind": "val", "step": 10, "epoch": 2, "top1": 0.75, "top5": 1.0, "num_bad_images": 0},
    ]
    fig = draw_metrics(rows, selected="top1")
    _, val_ax = fig.axes
    lines = {line.get_label(): line for line in val_ax.get_lines()}
    assert set(lines) == {"top1 (selects)", "top5"}
    assert list(lines["top1 (selects)"].get_ydata()) == [50.0, 75.0]
    assert lines["top1 (selects)"].get_linewidth() > lines["top5"].get_linewidth()


def test_segmentation_rows_draw_miou_not_the_image_count():
    from vembed.training.plot import validation_metrics

    val = [{"kind": "val", "step": 1, "epoch": 0.5, "miou": 0.2, "pixel_accuracy": 0.6, "num_images": 1}]
    assert validation_metrics(val) == ["miou", "pixel_accuracy"]


def test_one_training_row_is_a_visible_point():
    from vembed.training.plot import draw_metrics

    fig = draw_metrics([{"kind": "train", "step": 3, "loss": 1.5}])
    (line,) = fig.axes[0].get_lines()
    assert list(line.get_xdata()) == [3] and line.get_marker() == "o"


def test_the_legend_is_beside_the_curves_not_on_them():
    from vembed.training.plot import draw_metrics

    fig = draw_metrics(ROWS)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    val_ax = fig.axes[1]
    legend = val_ax.get_legend().get_window_extent(renderer)
    assert not _overlaps(legend, val_ax.get_window_extent(renderer))
    assert legend.x1 <= fig.bbox.x1 + 1  # and still inside the picture
