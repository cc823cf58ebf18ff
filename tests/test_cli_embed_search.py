"""``vembed embed`` / ``search`` / ``index`` through the real CLI: round trips, odd images, bad inputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import class_image, make_image_dataset, save_tiny_model
from PIL import Image
from typer.testing import CliRunner

from vembed.cli import app
from vembed.index.store import open_store

runner = CliRunner()


def run(*args, input: str | None = None, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args], input=input)
    assert result.exit_code == code, (
        f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    return result


def json_lines(text: str) -> list[dict]:
    """Every stdout line must be JSON (logs and progress go to stderr)."""
    return [json.loads(line) for line in text.splitlines()]


def flat(text: str) -> str:
    """stderr without the line breaks rich adds at the console width (so long paths read whole)."""
    return text.replace("\n", "")


def error_lines(result) -> list[str]:
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    return [line for line in result.stderr.splitlines() if "error:" in line]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = save_tiny_model(root / "model")
    make_image_dataset(root / "data", num_classes=3, per_class=4)
    run("embed", root / "data" / "images", "--model", model, "--out", root / "store", "-q")
    return {"root": root, "model": model, "images": root / "data" / "images", "store": root / "store"}


def test_embed_a_folder_then_every_image_finds_itself(setup):
    store = open_store(setup["store"])
    assert len(store) == 12 and store.labels[0] == "class_0"
    assert (setup["store"] / "settings.yaml").is_file()
    result = run("search", setup["store"], setup["images"], "--k", 3, "--jsonl", "-q", "data.num_workers=0")
    rows = json_lines(result.stdout)
    assert len(rows) == 12 * 3
    for row in rows:
        assert set(row) == {"query", "rank", "path", "label", "score"}
    firsts = [r for r in rows if r["rank"] == 1]
    assert [r["path"] for r in firsts] == [str(Path(r["query"]).resolve()) for r in firsts]
    assert all(r["score"] == pytest.approx(1.0, abs=1e-5) for r in firsts)
    assert "exact" in result.stderr


def test_search_prints_a_table_by_default(setup):
    query = setup["images"] / "class_2" / "img_1.png"
    result = run("search", setup["store"], query, "index.k=2")  # a trailing override, not a query
    assert "rank" in result.stdout and "score" in result.stdout and "class_2" in result.stdout
    assert result.stdout.count("1.0000") == 1


def test_embed_jsonl_streams_lines_that_search_reads_from_stdin(setup):
    result = run("embed", setup["images"] / "class_1", "--model", setup["model"], "--jsonl", "-q")
    rows = json_lines(result.stdout)
    assert len(rows) == 4 and all(len(r["embedding"]) == 32 for r in rows)
    assert rows[0]["path"].endswith("img_0.png") and "label" not in rows[0]  # no sub-folders: no label
    stored = open_store(setup["store"])
    own = stored.embeddings[stored.paths.index(str(Path(rows[0]["path"]).resolve()))]
    assert torch.allclose(torch.tensor(rows[0]["embedding"]), own, atol=1e-6)
    found = json_lines(run("search", setup["store"], "-", "--k", 1, "--jsonl", input=result.stdout).stdout)
    assert [r["path"] for r in found] == [str(Path(r["path"]).resolve()) for r in rows]
    assert all(r["score"] == pytest.approx(1.0, abs=1e-5) for r in found)


def test_image_paths_on_stdin(setup, tmp_path):
    paths = sorted(str(p) for p in setup["images"].rglob("*.png"))[:5]
    run("embed", "-", "--model", setup["model"], "--out", tmp_path / "s", "-q", input="\n".join(paths) + "\n")
    assert open_store(tmp_path / "s").paths == [str(Path(p).resolve()) for p in paths]
    rows = json_lines(run("search", tmp_path / "s", "-", "--k", 1, "--jsonl", input="\n".join(paths)).stdout)
    assert [r["path"] for r in rows] == [str(Path(p).resolve()) for p in paths]


def test_jsonl_records_source_keeps_labels(setup, tmp_path):
    run(
        "embed",
        setup["root"] / "data" / "records.jsonl",
        "--model",
        setup["model"],
        "--out",
        tmp_path / "s",
        "-q",
    )
    assert open_store(tmp_path / "s").labels == [0] * 4 + [1] * 4 + [2] * 4


def test_embed_needs_exactly_one_output(setup):
    for extra in ([], ["--out", "x", "--jsonl"]):
        result = run("embed", setup["images"], "--model", setup["model"], *extra, code=2)
        assert error_lines(result) == [
            "error: choose one output: --out STORE (a store folder) or --jsonl (JSON lines on stdout)"
        ]
    result = run("embed", setup["images"], "--model", setup["model"], "--jsonl", "--index", "hnsw", code=2)
    assert "it needs --out STORE" in error_lines(result)[0]


def _bad_inputs(root: Path) -> dict[str, tuple[list[str], str | None, str]]:
    """name → (SOURCE args, stdin, text the one error line must contain)."""
    good = root / "good.png"
    class_image(1, 1).save(good)
    (root / "empty.png").write_bytes(b"")
    buf = root / "full.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        buf, quality=95
    )
    (root / "truncated.jpg").write_bytes(buf.read_bytes()[: buf.stat().st_size // 2])
    (root / "missing.jsonl").write_text(
        json.dumps({"image": "good.png"}) + "\n" + json.dumps({"image": "nope.png"}) + "\n"
    )
    (root / "malformed.jsonl").write_text(json.dumps({"image": "good.png"}) + "\n{image: good.png\n")
    return {
        "zero-byte": ([str(root / "empty.png")], None, "empty.png"),
        "truncated": ([str(root / "truncated.jpg")], None, "truncated.jpg"),
        "missing-in-jsonl": ([str(root / "missing.jsonl")], None, "missing.jsonl:2: image not found"),
        "malformed-jsonl": ([str(root / "malformed.jsonl")], None, "malformed.jsonl:2: malformed JSON"),
        "missing-on-stdin": (["-"], f"{good}\n{root / 'gone.png'}\n", "<stdin>:2: image not found"),
        "missing-source": ([str(root / "nowhere")], None, "source not found"),
    }


@pytest.mark.parametrize(
    "case",
    ["zero-byte", "truncated", "missing-in-jsonl", "malformed-jsonl", "missing-on-stdin", "missing-source"],
)
def test_each_bad_input_is_one_error_line_and_nothing_written(setup, tmp_path, case):
    args, stdin, expected = _bad_inputs(tmp_path)[case]
    before = set(os.listdir(tmp_path))
    result = run("embed", *args, "--model", setup["model"], "--out", tmp_path / "store", input=stdin, code=2)
    (line,) = error_lines(result)
    assert expected in line
    assert set(os.listdir(tmp_path)) == before  # no store, no temporary folder


def test_bad_image_in_a_worker_is_one_line_and_the_old_store_survives(setup, tmp_path):
    folder = tmp_path / "imgs"
    shutil.copytree(setup["images"], folder)
    run("embed", folder, "--model", setup["model"], "--out", tmp_path / "s", "-q", "data.num_workers=0")
    (folder / "class_2" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    result = run(
        "embed",
        folder,
        "--model",
        setup["model"],
        "--out",
        tmp_path / "s",
        "-b",
        2,
        "--num-workers",
        2,
        code=2,
    )
    (line,) = error_lines(result)
    assert "zz_broken.png" in line and "cannot decode image" in line
    assert len(open_store(tmp_path / "s")) == 12  # the previous store is untouched
    assert sorted(os.listdir(tmp_path)) == ["imgs", "s"]
    result = run("embed", folder, "--model", setup["model"], "--out", tmp_path / "s", "--skip-bad", "-q")
    assert "skipped 1 bad" in result.stderr and "zz_broken.png" in flat(result.stderr)
    assert len(open_store(tmp_path / "s")) == 12 and open_store(tmp_path / "s").meta["num_skipped"] == 1


def test_refuses_to_replace_a_folder_that_is_not_a_store(setup, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    result = run("embed", setup["images"], "--model", setup["model"], "--out", tmp_path / "mine", code=2)
    assert "not a vembed store; refusing to replace it" in error_lines(result)[0]
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_odd_images_embed_and_exif_rotation_is_applied(setup, tmp_path):
    rgb = np.asarray(class_image(2, 0, size=48))
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    Image.fromarray((np.arange(48 * 48).reshape(48, 48) * 28).astype(np.uint16)).save(tmp_path / "deep16.png")
    assert Image.open(tmp_path / "deep16.png").mode.startswith("I")
    rgba = np.dstack([rgb, np.full((48, 48), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb).convert("L").save(tmp_path / "gray.png")
    # A non-square picture, and the same picture stored sideways with EXIF "rotate 90° CW to display".
    yy, xx = np.mgrid[0:48, 0:80]
    upright = Image.fromarray(
        np.stack([xx * 3 % 256, yy * 5 % 256, (xx + 2 * yy) * 2 % 256], -1).astype(np.uint8)
    )
    upright.save(tmp_path / "upright.jpg", quality=100, subsampling=0)
    sideways = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways.save(tmp_path / "exif6.jpg", quality=100, subsampling=0, exif=exif.tobytes())
    sideways.save(tmp_path / "sideways.jpg", quality=100, subsampling=0)

    result = run("embed", tmp_path, "--model", setup["model"], "--jsonl", "-q", "data.num_workers=0")
    rows = {Path(r["path"]).name: torch.tensor(r["embedding"]) for r in json_lines(result.stdout)}
    assert set(rows) == {
        "cmyk.jpg",
        "deep16.png",
        "rgba.png",
        "gray.png",
        "upright.jpg",
        "exif6.jpg",
        "sideways.jpg",
    }
    for vector in rows.values():
        assert torch.isfinite(vector).all() and vector.norm().item() == pytest.approx(1.0, abs=1e-5)
    rotated_gap = (rows["exif6.jpg"] - rows["upright.jpg"]).norm().item()
    unrotated_gap = (rows["sideways.jpg"] - rows["upright.jpg"]).norm().item()
    assert rotated_gap < 0.01 and rotated_gap * 20 < unrotated_gap, (rotated_gap, unrotated_gap)


def test_search_errors(setup, tmp_path):
    query = setup["images"] / "class_0" / "img_0.png"
    assert "store not found" in error_lines(run("search", tmp_path / "none", query, code=2))[0]
    assert (
        "query image not found: nope.png" in error_lines(run("search", setup["store"], "nope.png", code=2))[0]
    )
    (tmp_path / "empty.png").write_bytes(b"")
    (line,) = error_lines(run("search", setup["store"], tmp_path / "empty.png", code=2))
    assert "empty.png" in line
    result = run("search", setup["store"], tmp_path / "empty.png", query, "--skip-bad", "--jsonl", "-q")
    assert len(json_lines(result.stdout)) == 10 and "skipped 1 bad" in result.stderr
    assert "no queries" in error_lines(run("search", setup["store"], code=2))[0]
    assert (
        "unknown setting 'index.kk'"
        in error_lines(run("search", setup["store"], query, "index.kk=3", code=2))[0]
    )


def test_grid_png_and_exclude_self(setup, tmp_path):
    out = tmp_path / "grid.png"
    result = run(
        "search",
        setup["store"],
        setup["images"] / "class_1",
        "--k",
        3,
        "--exclude-self",
        "--grid",
        out,
        "--thumb",
        32,
        "--jsonl",
        "-q",
    )
    rows = json_lines(result.stdout)
    assert len(rows) == 12 and all(r["path"] != str(Path(r["query"]).resolve()) for r in rows)
    grid = Image.open(out)
    assert grid.format == "PNG" and grid.height > 4 * 32 and grid.width > 4 * 32


def test_index_build_then_search_uses_it(setup, tmp_path):
    shutil.copytree(setup["store"], tmp_path / "s")
    for kind in ("hnsw", "ivf", "flat"):
        run("index", "build", tmp_path / "s", "--kind", kind)
        result = run("search", tmp_path / "s", setup["images"], "--k", 1, "--jsonl", "-q")
        assert kind in result.stderr
        rows = json_lines(result.stdout)
        assert sum(r["path"] == str(Path(r["query"]).resolve()) for r in rows) >= 11
    assert "flat" in run("index", "info", tmp_path / "s").stdout
    assert (
        "exact search needs no index"
        in error_lines(run("index", "build", tmp_path / "s", "--kind", "exact", code=2))[0]
    )


def test_shell_pipeline(setup):
    """The real thing: `vembed embed ... --jsonl | vembed search STORE - --jsonl` in a shell."""
    vembed = f"{sys.executable} -m vembed"
    query = setup["images"] / "class_2" / "img_3.png"
    command = f"{vembed} embed {query} --model {setup['model']} --jsonl -q | {vembed} search {setup['store']} - --k 2 --jsonl -q"
    done = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    rows = json_lines(done.stdout)
    assert [r["rank"] for r in rows] == [1, 2] and rows[0]["path"] == str(query.resolve())
