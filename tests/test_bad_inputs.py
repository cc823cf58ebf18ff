"""The standing bad-input suite: every command that reads images, records, settings or models, fed each
kind of bad input, through the real CLI (see docs/reliability.md).

One row per case in ``CASES``: the command line (``{name}`` fields are fixture paths, see ``world``), the
exit status, and the text stderr must name (the culprit). Every row also asserts that no traceback
reaches the user, that a failed command wrote nothing (``{out}`` does not exist, no temporaries), and
that the shared inputs (model, records, images, store) are byte-for-byte unchanged.

Add a case: append a ``Case``; add a bad input: write it in ``world`` and reference it by name.
Interruptions (SIGINT / SIGKILL during train, embed and export) are at the end of the file.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image_dataset, save_tiny_model
from PIL import Image
from typer.testing import CliRunner

from vembed.cli import app

runner = CliRunner()


# -- the bad inputs -------------------------------------------------------------------------------


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that claims ``width × height`` (a decompression bomb) but holds almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def write_bad_images(bad: Path) -> None:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8), "RGB")
    (bad / "zero.png").write_bytes(b"")
    rgb.save(bad / "full.png")
    data = (bad / "full.png").read_bytes()
    (bad / "trunc.png").write_bytes(data[: len(data) // 2])
    (bad / "text.png").write_text("this is not an image\n")
    png_header_only(bad / "bomb.png", 20000, 20000)
    rgb.convert("CMYK").save(bad / "cmyk.jpg")
    Image.fromarray((rng.integers(0, 65535, (40, 40))).astype(np.uint16)).save(bad / "gray16.png")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(bad / "alpha.png")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(bad / "tiny1.png")
    Image.new("RGB", (400, 300), (10, 200, 30)).save(bad / "big.jpg")  # over a 50,000-pixel limit


BAD_IMAGES = ["missing", "zero", "trunc", "text", "bomb"]  # → one-line error, skippable
ODD_IMAGES = ["cmyk", "gray16", "alpha", "tiny1"]  # → decoded
SUFFIX = {"cmyk": "jpg"}


def image_file(kind: str) -> str:
    return f"{kind}.{SUFFIX.get(kind, 'png')}"


def write_bad_records(bad: Path, good: list[str]) -> None:
    """``{kind}.jsonl``: the good records plus one bad image; record-format mistakes besides."""
    for kind in BAD_IMAGES + ODD_IMAGES:
        row = json.dumps({"image": image_file(kind), "label": 0})
        (bad / f"{kind}.jsonl").write_text("\n".join([*good, row]) + "\n")
    (bad / "malformed.jsonl").write_text(
        "\n".join([*good[:2], '{"image": "full.png", "label": 0', *good[2:]])
    )
    (bad / "wrongtype.jsonl").write_text("\n".join([good[0], '{"image": 123, "label": 0}', *good[1:]]))
    (bad / "badlabel.jsonl").write_text(
        "\n".join([good[0], '{"image": "full.png", "label": [1]}', *good[1:]])
    )
    (bad / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(good).encode() + b"\n")
    (bad / "empty.jsonl").write_text("")
    single = json.dumps({"image": "full.png", "label": 99})
    (bad / "single.jsonl").write_text("\n".join([*good, single]) + "\n")
    (bad / "nolabel.jsonl").write_text("\n".join(json.dumps({"image": "full.png"}) for _ in range(3)) + "\n")


def write_bad_configs(bad: Path) -> None:
    (bad / "unknown_key.yaml").write_text("train:\n  lrr: 0.1\n")
    (bad / "wrong_type.yaml").write_text("train:\n  lr: fast\n")
    (bad / "broken.yaml").write_text("train:\n  lr: [1e-3\n")
    (bad / "unknown_loss.yaml").write_text("train:\n  loss: nope\n")
    (bad / "not_mapping.yaml").write_text("- a\n- b\n")


def write_bad_models(models: Path, good: Path) -> None:
    shutil.copytree(good, models / "truncated")
    weights = models / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (models / "pickled").mkdir()
    shutil.copy(good / "config.json", models / "pickled" / "config.json")
    (models / "pickled" / "pytorch_model.bin").write_bytes(_evil_pickle(models / "pwned"))
    (models / "noweights").mkdir()
    shutil.copy(good / "config.json", models / "noweights" / "config.json")
    (models / "empty").mkdir()


def _evil_pickle(marker: Path) -> bytes:
    """A torch.save file whose payload would create ``marker`` if it were ever unpickled for real."""
    import io

    import torch

    class Payload:
        def __reduce__(self):
            return (os.makedirs, (str(marker),))

    buffer = io.BytesIO()
    torch.save({"weight": Payload()}, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The shared inputs every case reads (never written to: checked after each case)."""
    root = tmp_path_factory.mktemp("bad-inputs")
    model = save_tiny_model(root / "model")
    records = make_image_dataset(root / "data", num_classes=3, per_class=4)
    bad = root / "bad"
    bad.mkdir()
    write_bad_images(bad)
    good = [
        json.dumps({**json.loads(line), "image": str(root / "data" / json.loads(line)["image"])})
        for line in records.read_text().splitlines()
    ]
    write_bad_records(bad, good)
    write_bad_configs(bad)
    (root / "models").mkdir()
    write_bad_models(root / "models", model)
    result = runner.invoke(app, ["embed", str(root / "data" / "images"), "--model", str(model), "--out",
                                 str(root / "store"), "-q", "data.num_workers=0"])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return {
        "root": root,
        "model": model,
        "data": records,
        "images": root / "data" / "images",
        "query": root / "data" / "images" / "class_0" / "img_0.png",
        "store": root / "store",
        "bad": bad,
        "models": root / "models",
    }


def add_segmentation(world: dict) -> dict:
    """A tiny segmentation model, mask records, and mask records with one bad mask each (``seg_*``)."""
    from vembed.data.prepare import prepare_segfolder
    from vembed.data.shapes import write_shapes
    from vembed.models.factory import save_model
    from vembed.models.segmenter import create_segmenter
    from vembed.settings import ModelSettings

    seg = world["root"] / "seg"
    if not seg.exists():
        write_shapes(seg / "shapes", count=6, size=40)
        prepare_segfolder(seg / "shapes", seg / "data", val_ratio=0.5, test_ratio=0)
        model = create_segmenter(world["model"], ModelSettings(image_size=28), num_classes=3)
        save_model(model, seg / "model", head=model.head())
        val = (seg / "data" / "val.jsonl").read_text().splitlines()
        first = json.loads(val[0])
        image = str(seg / "data" / first["image"])
        bad = world["bad"]
        Image.new("RGB", (40, 40), (10, 200, 30)).save(bad / "colour_mask.png")
        (bad / "predict_bomb.jsonl").write_text('{"image": "full.png"}\n{"image": "bomb.png"}\n')
        for kind in [*BAD_IMAGES, "colour_mask"]:
            row = json.dumps({"image": image, "mask": str(bad / image_file(kind))})
            absolute = [
                json.dumps({k: str(seg / "data" / v) for k, v in json.loads(line).items()}) for line in val
            ]
            (bad / f"seg_{kind}.jsonl").write_text("\n".join([*absolute, row]) + "\n")
    return {**world, "segmodel": seg / "model", "segdata": seg / "data" / "val.jsonl"}


# -- the table ------------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    args: str  # the command line; {model} {data} {images} {query} {store} {bad} {models} {out} {run}
    culprit: str | None  # stderr must contain it (after line breaks are removed); None: nothing asked
    code: int = 2
    prior: str | None = None  # copy this fixture to {out} first: a failed run must leave it unchanged


FAST = "data.num_workers=0"
TRAIN = f"--model {{model}} --output-dir {{out}} train.epochs=1 train.batch_size=4 eval.k=1 {FAST}"
EMBED = f"--model {{model}} --out {{out}} -q {FAST}"
EVAL = f"--model {{model}} {FAST}"
CONFIG_CASES = [  # (file under {bad}, what stderr must name)
    ("unknown_key.yaml", "train.lrr"),
    ("wrong_type.yaml", "train.lr"),
    ("broken.yaml", "broken.yaml:3"),
    ("not_mapping.yaml", "not_mapping.yaml"),
    ("missing.yaml", "missing.yaml"),
    ("", "is a folder"),  # {bad} itself: a folder given as --config
]
MODEL_CASES = [  # (--model value, what stderr must name)
    ("{models}/truncated", "truncated/model.safetensors"),
    ("{models}/pickled", "pickled/pytorch_model.bin"),
    ("{models}/noweights", "noweights"),
    ("{models}/empty", "empty"),
    ("{model}/config.json", "config.json"),
    ("{root}/no/such/model", "no/such/model"),
    ("dinov2-smal", "dinov2-smal"),  # an unknown registry name
]

CASES: list[Case] = []
for kind in BAD_IMAGES:
    f = image_file(kind)
    CASES += [
        Case(f"embed-image-{kind}", f"embed {{bad}}/{f} {EMBED}", f),
        Case(f"embed-records-{kind}", f"embed {{bad}}/{kind}.jsonl {EMBED}", f),
        Case(f"search-{kind}", f"search {{store}} {{bad}}/{f} -q {FAST}", f),
        Case(f"eval-{kind}", f"eval retrieval --data {{bad}}/{kind}.jsonl {EVAL}", f),
        Case(f"prepare-{kind}", f"prepare jsonl {{bad}}/{kind}.jsonl --check-images --out {{out}}", f),
    ]
for kind in ODD_IMAGES:
    f = image_file(kind)
    CASES += [
        Case(f"embed-odd-{kind}", f"embed {{bad}}/{f} {EMBED}", None, 0),
        Case(f"eval-odd-{kind}", f"eval retrieval --data {{bad}}/{kind}.jsonl {EVAL}", None, 0),
    ]
CASES += [
    # skipped and counted with --skip-bad, like any bad image
    Case("embed-skip-bomb", f"embed {{bad}}/bomb.jsonl --skip-bad {EMBED}", "bomb.png", 0),
    Case(
        "search-skip-bomb", f"search {{store}} {{bad}}/bomb.png {{query}} --skip-bad -q {FAST}", "bomb.png", 0
    ),
    Case("eval-skip-bomb", f"eval retrieval --data {{bad}}/bomb.jsonl --skip-bad {EVAL}", "bomb.png", 0),
    Case(
        "prepare-skip-bomb",
        "prepare jsonl {bad}/bomb.jsonl --check-images --skip-bad --out {out}",
        "bomb.png",
        0,
    ),
    # a large JPEG under a small data.max_image_pixels: decoded at a reduced scale; a PNG is refused
    Case("embed-big-jpeg-draft", f"embed {{bad}}/big.jpg {EMBED} data.max_image_pixels=50000", None, 0),
    Case("embed-big-png-limit", f"embed {{bad}}/full.png {EMBED} data.max_image_pixels=100", "full.png"),
    # records: malformed line, wrong types, BOM, empty split, single-image class, no labels
    Case("embed-malformed", f"embed {{bad}}/malformed.jsonl {EMBED}", "malformed.jsonl:3"),
    Case("eval-malformed", f"eval retrieval --data {{bad}}/malformed.jsonl {EVAL}", "malformed.jsonl:3"),
    Case("prepare-malformed", "prepare jsonl {bad}/malformed.jsonl --out {out}", "malformed.jsonl:3"),
    Case("search-malformed", f"search {{store}} {{bad}}/malformed.jsonl -q {FAST}", "malformed.jsonl:3"),
    Case(
        "embed-wrongtype",
        f"embed {{bad}}/wrongtype.jsonl {EMBED}",
        "wrongtype.jsonl:2: field 'image' must be",
    ),
    Case("eval-wrongtype", f"eval retrieval --data {{bad}}/wrongtype.jsonl {EVAL}", "wrongtype.jsonl:2"),
    Case("prepare-wrongtype", "prepare jsonl {bad}/wrongtype.jsonl --out {out}", "wrongtype.jsonl:2"),
    Case("eval-badlabel", f"eval retrieval --data {{bad}}/badlabel.jsonl {EVAL}", "badlabel.jsonl:2"),
    Case("eval-nolabel", f"eval retrieval --data {{bad}}/nolabel.jsonl {EVAL}", "nolabel.jsonl:1"),
    Case("embed-bom", f"embed {{bad}}/bom.jsonl {EMBED}", None, 0),
    Case("eval-bom", f"eval retrieval --data {{bad}}/bom.jsonl {EVAL}", None, 0),
    Case("prepare-bom", "prepare jsonl {bad}/bom.jsonl --out {out}", None, 0),
    Case("embed-empty", f"embed {{bad}}/empty.jsonl {EMBED}", "empty.jsonl"),
    Case("eval-empty", f"eval retrieval --data {{bad}}/empty.jsonl {EVAL}", "empty.jsonl"),
    Case("prepare-empty", "prepare jsonl {bad}/empty.jsonl --out {out}", "empty.jsonl"),
    Case("train-empty", f"train --data {{bad}}/empty.jsonl {TRAIN}", "empty.jsonl"),
    Case("eval-single-class", f"eval retrieval --data {{bad}}/single.jsonl {EVAL}", None, 0),
    # training: a bad image stops before anything is kept (no run folder left), or is skipped and counted
    Case("train-bomb", f"train --data {{bad}}/bomb.jsonl {TRAIN}", "bomb.png"),
    Case("train-skip-bomb", f"train --data {{bad}}/bomb.jsonl {TRAIN} data.skip_bad=true", "bomb.png", 0),
    Case("train-malformed", f"train --data {{bad}}/malformed.jsonl {TRAIN}", "malformed.jsonl:3"),
    Case(
        "train-single-class",
        f"train --data {{bad}}/single.jsonl {TRAIN}",
        "1 of 4 classes have a single image",
        0,
    ),
    Case("train-unknown-loss", f"train --data {{data}} {TRAIN} train.loss=nope", "nope"),
    Case("train-unknown-type", f"train --data {{data}} {TRAIN} train.method=half", "train.method"),
    Case("train-data-folder", f"train --data {{images}} {TRAIN}", "images"),
    Case("train-resume-truncated", "train --config {run}/settings.yaml --resume", "model.safetensors"),
    # settings: unknown key / type / value, unknown override
    Case("embed-unknown-override", f"embed {{query}} {EMBED} data.num_workerz=1", "data.num_workerz"),
    Case("eval-wrong-type", f"eval retrieval --data {{data}} {EVAL} eval.k=many", "eval.k"),
    Case("config-unknown-key", "config show train.lrr=1", "train.lrr"),
    # file-vs-folder confusions, output paths checked before any work
    Case("eval-json-folder", f"eval retrieval --data {{data}} {EVAL} --json {{bad}}", "--json"),
    Case("search-grid-folder", f"search {{store}} {{query}} --grid {{bad}} -q {FAST}", "--grid"),
    Case("embed-out-file", f"embed {{query}} --model {{model}} --out {{data}} -q {FAST}", "records.jsonl"),
    Case("embed-out-under-file", "embed {query} --model {model} --out {data}/x -q", "records.jsonl"),
    Case("export-out-file", "export {model} --out {data}", "records.jsonl"),
    Case("export-json-folder", "export {model} --out {out} --json {bad}", "--json"),
    Case("prepare-out-file", "prepare jsonl {bad}/bom.jsonl --out {query}", "img_0.png"),
    Case("embed-source-missing", f"embed {{bad}}/nothing-here {EMBED}", "nothing-here"),
    Case("search-store-missing", "search {bad}/no-store {query} -q", "no-store"),
    Case("search-store-is-file", "search {data} {query} -q", "records.jsonl"),
    Case("search-store-not-store", "search {images} {query} -q", "images"),
    Case("eval-data-folder", f"eval retrieval --data {{images}} {EVAL}", "images"),
    # a failed embed into an existing store leaves it as it was
    Case("embed-over-store-bad", f"embed {{bad}}/trunc.png {EMBED}", "trunc.png", prior="store"),
]
for kind in [*BAD_IMAGES, "colour_mask"]:  # segmentation: bad masks and bad images
    f = image_file(kind)
    CASES.append(
        Case(
            f"eval-seg-mask-{kind}",
            f"eval segmentation --model {{segmodel}} --data {{bad}}/seg_{kind}.jsonl",
            f,
        )
    )
    if kind != "colour_mask":
        CASES.append(
            Case(f"predict-masks-{kind}", f"predict-masks {{segmodel}} {{bad}}/{f} --out {{out}}", f)
        )
CASES += [
    Case(
        "predict-masks-skip-bomb",
        "predict-masks {segmodel} {bad}/predict_bomb.jsonl --out {out} --skip-bad",
        "bomb.png",
        0,
    ),
    Case("predict-masks-not-seg", "predict-masks {model} {query} --out {out}", "not a segmentation model"),
    Case("predict-masks-out-file", "predict-masks {segmodel} {query} --out {data}", "records.jsonl"),
    Case(
        "eval-seg-json-folder", "eval segmentation --model {segmodel} --data {segdata} --json {bad}", "--json"
    ),
    Case(
        "eval-seg-plot-folder", "eval segmentation --model {segmodel} --data {segdata} --plot {bad}", "--plot"
    ),
    Case("eval-seg-records-not-masks", "eval segmentation --model {segmodel} --data {data}", "records.jsonl"),
    Case(
        "eval-seg-truncated-model",
        "eval segmentation --model {models}/truncated --data {segdata}",
        "truncated",
    ),
]
KNN = f"eval knn --model {{model}} --train {{data}} {FAST}"
PROBE = f"eval linear-probe --model {{model}} --train {{data}} --val {{data}} --no-cache {FAST}"
FEWSHOT = f"eval fewshot --model {{model}} --support {{data}} --k 1 {FAST}"
for kind in ["bomb", "trunc", "malformed", "wrongtype", "empty"]:  # classification evaluators
    f = image_file(kind) if kind in BAD_IMAGES else f"{kind}.jsonl"
    CASES += [
        Case(f"eval-knn-{kind}", f"{KNN} --test {{bad}}/{kind}.jsonl", f),
        Case(f"eval-probe-{kind}", f"{PROBE} --test {{bad}}/{kind}.jsonl", f),
        Case(f"eval-fewshot-{kind}", f"{FEWSHOT} --query {{bad}}/{kind}.jsonl", f),
    ]
CASES += [
    Case("eval-knn-skip-bomb", f"{KNN} --test {{bad}}/bomb.jsonl data.skip_bad=true", "bomb.png", 0),
    Case("eval-knn-json-folder", f"{KNN} --test {{data}} --json {{bad}}", "--json"),
    Case("eval-probe-json-folder", f"{PROBE} --test {{data}} --json {{bad}}", "--json"),
    Case("eval-fewshot-plot-folder", f"{FEWSHOT} --query {{data}} --plot {{bad}}", "--plot"),
    Case(
        "eval-knn-truncated-model",
        "eval knn --model {models}/truncated --train {data} --test {data}",
        "truncated",
    ),
    Case(
        "eval-probe-pickled-model",
        "eval linear-probe --model {models}/pickled --train {data} --val {data} --test {data}",
        "pickled",
    ),
]
for name, culprit in CONFIG_CASES:
    config = f"{{bad}}/{name}" if name else "{bad}"
    CASES += [
        Case(f"config-show-{name or 'folder'}", f"config show {config}", culprit),
        Case(f"train-config-{name or 'folder'}", f"train --config {config} --data {{data}} {TRAIN}", culprit),
        Case(f"embed-config-{name or 'folder'}", f"embed {{query}} --config {config} {EMBED}", culprit),
        Case(
            f"eval-config-{name or 'folder'}",
            f"eval retrieval --config {config} --data {{data}} {EVAL}",
            culprit,
        ),
    ]
CASES = [c for c in CASES if not (c.id.startswith(("embed-config-unknown_loss", "eval-config-unknown_loss")))]
for ref, culprit in MODEL_CASES:
    short = ref.rsplit("/", 1)[-1].replace(".", "-")
    CASES += [
        Case(f"embed-model-{short}", f"embed {{query}} --model {ref} --out {{out}} -q", culprit),
        Case(f"eval-model-{short}", f"eval retrieval --data {{data}} --model {ref} {FAST}", culprit),
        Case(f"export-model-{short}", f"export {ref} --out {{out}}", culprit),
        Case(f"train-model-{short}", f"train --data {{data}} {TRAIN} --model {ref}", culprit),
    ]


@pytest.fixture(scope="module")
def run_with_truncated_checkpoint(world, tmp_path_factory):
    """A stopped run whose last checkpoint's model.safetensors was cut short."""
    out = tmp_path_factory.mktemp("truncated-run") / "run"
    args = f"train --data {world['data']} {TRAIN} train.max_steps=2 train.checkpoint_every=1"
    result = runner.invoke(app, _format(args, {**world, "out": out}).split())
    assert result.exit_code == 0, result.stderr
    shutil.rmtree(out / "final")
    last = sorted((out / "checkpoints").iterdir())[-1]
    weights = last / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return out


def _format(template: str, paths: dict) -> str:
    return template.format(**{k: str(v) for k, v in paths.items()})


def _snapshot(root: Path) -> dict[str, str]:
    """Every file below ``root`` → its hash (the shared inputs must never change)."""
    return {
        str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(autouse=True)
def _environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a wrong hub id fails at once instead of retrying
    monkeypatch.setenv("VEMBED_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.delenv("VEMBED_DEBUG", raising=False)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, world, tmp_path, request):
    paths = {**world, "out": tmp_path / "out"}
    if "{run}" in case.args:
        paths["run"] = request.getfixturevalue("run_with_truncated_checkpoint")
    if "{seg" in case.args:
        paths = {**add_segmentation(world), "out": paths["out"]}
    if case.prior:
        shutil.copytree(world[case.prior], paths["out"])
    prior = _snapshot(paths["out"]) if case.prior else None
    shared = _snapshot(world["root"])
    result = runner.invoke(app, _format(case.args, paths).split())
    err = result.stderr.replace("\n", "")
    assert result.exit_code == case.code, f"exit {result.exit_code}\n{result.stderr}\n{result.exception!r}"
    assert "Traceback" not in result.stderr + result.stdout
    assert "unexpected" not in err, err  # an expected failure, not a bug report
    if case.culprit is not None:
        assert case.culprit in err, err
    if case.code != 0:
        assert len([line for line in result.stderr.splitlines() if "error:" in line]) == 1, result.stderr
        if prior is not None:
            assert _snapshot(paths["out"]) == prior
        else:
            assert not paths["out"].exists(), sorted(paths["out"].rglob("*"))
        assert not [p for p in tmp_path.iterdir() if p.name not in ("out", "logs")]  # no temporaries
    assert _snapshot(world["root"]) == shared
    assert not (world["models"] / "pwned").exists()  # the pickle's payload never ran


# -- unexpected failures: one line with a log path; --debug prints the traceback ---------------------


def test_an_unexpected_error_is_one_line_with_a_log(world, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    app_module = importlib.import_module("vembed.cli.app")  # (vembed.cli.app is also the Typer object)
    monkeypatch.setattr(app_module, "load_settings", broken)  # every command reads its settings
    args = ["embed", str(world["query"]), "--model", str(world["model"]), "--out", str(tmp_path / "o")]
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert "Traceback" not in result.stderr
    line = result.stderr.replace("\n", "")
    assert "unexpected ZeroDivisionError: a bug" in line and "--debug" in line
    logs = list((tmp_path / "logs").glob("vembed-*.log"))
    assert (
        len(logs) == 1 and "Traceback" in logs[0].read_text() and "ZeroDivisionError" in logs[0].read_text()
    )
    for debug in (["--debug", *args], [*args, "--debug"]):
        result = runner.invoke(app, debug)
        assert result.exit_code == 1 and "Traceback" in result.stderr
        monkeypatch.delenv("VEMBED_DEBUG", raising=False)
    monkeypatch.setenv("VEMBED_DEBUG", "1")
    assert "Traceback" in runner.invoke(app, args).stderr


def test_store_files_are_readable_by_others(world):
    for path in world["store"].iterdir():
        assert path.stat().st_mode & 0o044 == 0o044 & ~_umask() & 0o044, path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- interruptions: SIGINT / SIGKILL during train, embed and export ----------------------------------
#
# SIGKILL: a subprocess kills itself right after its first safetensors file lands in a folder that is not
# published yet (the worst moment). SIGINT (Ctrl-C): in-process, sent at the same moment.

KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import safetensors.torch as st
    real, calls = st.save_file, [0]
    def save_file(*args, **kwargs):
        real(*args, **kwargs)
        calls[0] += 1
        if calls[0] == int(os.environ["KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)
    st.save_file = save_file
    from vembed.cli import main
    sys.argv = ["vembed", *sys.argv[1:]]
    main()
    """
)


def killed(args: list, tmp_path: Path, at: int = 1) -> subprocess.CompletedProcess:
    """``vembed ARGS`` in a subprocess that SIGKILLs itself after its ``at``-th safetensors file."""
    env = {**os.environ, "KILL_AT": str(at), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "VEMBED_LOG_DIR": str(tmp_path / "logs")}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, *map(str, args)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    return proc


@pytest.fixture
def ctrl_c_at(monkeypatch):
    """``ctrl_c_at(module, name, n)``: the ``n``-th call of ``module.name`` sends this process SIGINT."""

    def arm(module, name: str, n: int = 1):
        real, calls = getattr(module, name), []

        def wrapper(*args, **kwargs):
            result = real(*args, **kwargs)
            calls.append(1)
            if len(calls) == n:
                os.kill(os.getpid(), signal.SIGINT)
            return result

        monkeypatch.setattr(module, name, wrapper)

    return arm


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("sig", ["SIGINT", "SIGKILL"])
def test_interrupted_embed_keeps_the_previous_store(world, tmp_path, sig, ctrl_c_at):
    import vembed.io

    out = tmp_path / "store"
    shutil.copytree(world["store"], out)
    before = _snapshot(out)
    args = ["embed", world["bad"] / "cmyk.jpg", "--model", world["model"], "--out", out, "-q", FAST]
    if sig == "SIGKILL":
        assert "Traceback" not in killed(args, tmp_path).stderr  # kill -9 runs no cleanup: the next run does
    else:
        ctrl_c_at(vembed.io, "_umask")  # every atomic write asks for the umask (its file written)
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 130 and "interrupted" in result.stderr, result.stderr
        # embed keeps its finished shards in .store.embedding/ for the next run (docs/scale.md)
        assert "Traceback" not in result.stderr and leftovers(tmp_path) in ([], [".store.embedding"])
    assert _snapshot(out) == before
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.stderr
    assert leftovers(tmp_path) == [] and _snapshot(out) != before


@pytest.mark.parametrize("sig", ["SIGINT", pytest.param("SIGKILL", marks=pytest.mark.slow)])
def test_interrupted_export_keeps_the_previous_folder(world, tmp_path, sig, ctrl_c_at):
    """(SIGKILL goes through the same vembed.io.atomic_dir as embed's, whose SIGKILL test runs by default.)"""
    import vembed.io

    out = tmp_path / "exported"
    args = ["export", str(world["model"]), "--out", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    before = _snapshot(out)
    if sig == "SIGKILL":
        assert "Traceback" not in killed(args, tmp_path).stderr
    else:
        ctrl_c_at(vembed.io, "make_readable")
        result = runner.invoke(app, args)
        assert result.exit_code == 130 and "Traceback" not in result.stderr, result.stderr
        assert leftovers(tmp_path) == []
    assert _snapshot(out) == before
    assert runner.invoke(app, args).exit_code == 0
    assert leftovers(tmp_path) == []


def _train_args(world, out: Path) -> list[str]:
    extra = "train.max_steps=4 train.checkpoint_every=1 train.augment=false -q"
    return [
        "train",
        "--data",
        str(world["data"]),
        *_format(TRAIN, {**world, "out": out}).split(),
        *extra.split(),
    ]


@pytest.fixture(scope="module")
def uninterrupted_run(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = runner.invoke(app, _train_args(world, out))
    assert result.exit_code == 0, result.stderr
    return out


@pytest.mark.parametrize("sig", ["SIGINT", pytest.param("SIGKILL", marks=pytest.mark.slow)])
def test_interrupted_train_resumes_to_the_same_weights(world, tmp_path, sig, uninterrupted_run, ctrl_c_at):
    """(SIGKILL of `vembed train` is also tested by test_training_resume.py, hence slow here.)"""
    from safetensors.torch import load_file

    import vembed.training.checkpoint as ckpt

    run = tmp_path / "run"
    args = _train_args(world, run)
    if sig == "SIGKILL":
        killed(args, tmp_path, at=5)  # while writing the second checkpoint
    else:
        ctrl_c_at(ckpt, "make_readable", 2)  # while writing the second checkpoint
        result = runner.invoke(app, args)
        assert result.exit_code == 130 and "Traceback" not in result.stderr, result.stderr
        assert "--resume" in result.stderr
    assert not (run / "final").exists() and ckpt.list_checkpoints(run)
    resumed = runner.invoke(app, [*args, "--resume"])
    assert resumed.exit_code == 0, resumed.stderr
    mine = load_file(str(run / "final" / "model.safetensors"))
    theirs = load_file(str(uninterrupted_run / "final" / "model.safetensors"))
    assert max((mine[k] - theirs[k]).abs().max().item() for k in theirs) <= 1e-5


def test_a_stopped_training_is_reported_as_interrupted_wherever_it_runs(tmp_path, capsys):
    """The quickstart (or any command that trains) stopped by SIGTERM: one yellow line saying where the
    checkpoint is and how to continue, exit 130 -- never "this is a bug in vembed"."""
    from vembed.cli.failures import INTERRUPTED_EXIT, report
    from vembed.training import TrainingInterrupted

    stop = TrainingInterrupted(
        "stopped by SIGTERM at step 5/9; checkpoint c; continue with --resume", tmp_path
    )
    assert report(stop) == INTERRUPTED_EXIT
    err = capsys.readouterr().err
    assert "stopped by SIGTERM at step 5/9" in err and "bug" not in err
