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
