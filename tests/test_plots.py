"""What the evaluation pictures draw: checked on the matplotlib artists, not only that a PNG exists."""

from __future__ import annotations

import numpy as np
from PIL import Image

from vembed.tasks.segmentation.plots import draw_segmentation, plot_segmentation

CORRUPTIONS = ["gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
               "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate"]  # fmt: skip


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def _panels():
    image = Image.fromarray(np.full((32, 32, 3), 120, np.uint8))
    truth = np.zeros((32, 32), np.uint8)
    truth[4:12, 4:12] = 1
    truth[0, :] = 255
    pred = truth.copy()
    pred[20:28, 20:28] = 2
    return [(image, truth, pred)]


def test_one_severity_is_a_bar_per_corruption_with_the_clean_line():
    values = {name: {"5": 0.1 + 0.02 * i} for i, name in enumerate(CORRUPTIONS)}
    fig = draw_segmentation(_panels(), values, title="run", clean=0.8)
    chart = fig.axes[-1]
    bars = chart.patches
    assert len(bars) == 14
    assert [round(b.get_height(), 6) for b in bars] == [round(100 * (0.1 + 0.02 * i), 6) for i in range(14)]
    assert [t.get_text() for t in chart.get_xticklabels()] == CORRUPTIONS
    assert [line.get_ydata()[0] for line in chart.get_lines()] == [80.0]  # the clean mIoU


def test_several_severities_draw_a_curve_per_corruption_in_distinct_colours():
    values = {name: {str(s): 0.5 - 0.05 * s for s in (1, 3, 5)} for name in CORRUPTIONS}
    fig = draw_segmentation(_panels(), values)
    chart = fig.axes[-1]
    curves = [line for line in chart.get_lines() if line.get_label() in CORRUPTIONS]
    assert len(curves) == 14 and list(curves[0].get_xdata()) == [1, 3, 5]
    assert len({tuple(line.get_color()) for line in curves}) == 14
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert not _overlaps(chart.get_legend().get_window_extent(renderer), chart.get_window_extent(renderer))


def test_class_colour_legend_and_title_clear_of_the_column_headers():
    fig = draw_segmentation(_panels(), title="runs/voc/final", class_names=["background", "square", "disc"])
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["background", "square", "disc", "ignored (255)"]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    title = fig._suptitle.get_window_extent(renderer)
    headers = [ax.title for ax in fig.axes if ax.get_title()]
    assert [h.get_text() for h in headers] == ["image", "ground truth", "prediction"]
    for header in headers:
        assert not _overlaps(title, header.get_window_extent(renderer))
    box = legend.get_window_extent(renderer)
    for ax in fig.axes:
        assert not _overlaps(box, ax.get_window_extent(renderer))


def test_plot_segmentation_writes_the_png(tmp_path):
    out = plot_segmentation(tmp_path / "seg.png", _panels(), {"fog": {"5": 0.4}}, class_names=["bg", "sq"])
    assert Image.open(out).format == "PNG" and list(tmp_path.iterdir()) == [out]


def test_fewshot_legend_is_not_on_the_curves(tmp_path, monkeypatch):
    from vembed.evaluation import plots
    from vembed.evaluation.fewshot import FewShotReport, ShotScore

    def report(model, offset):
        results = {
            name: {k: ShotScore(base + offset + 0.04 * k, 0.9, None, 100) for k in (1, 3, 10)}
            for name, base in (("seen", 0.5), ("unseen", 0.4))
        }
        return FewShotReport(model=model, results=results)

    drawn = {}
    monkeypatch.setattr(plots, "save_figure", lambda fig, out: drawn.setdefault("fig", fig))
    plots.plot_fewshot([report("a", 0.0), report("b", 0.1)], tmp_path / "f.png")
    fig = drawn["fig"]
    curve = fig.axes[0]
    assert len(curve.get_lines()) == 4
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend = curve.get_legend().get_window_extent(renderer)
    assert not _overlaps(legend, curve.get_window_extent(renderer))
    assert legend.y0 >= fig.bbox.y0 - 1  # inside the picture
