"""Run every shell command of README.md and docs/*.md offline, with tiny stand-ins (``test_docs_commands``).

Every fenced ``bash`` block is run as written, in order, by ``bash -eo pipefail`` in one sandbox folder
(so the data a ``vembed prepare`` writes is what the next block trains on), with four kinds of
stand-in, all in the tables below:

- **models** — a registry name or hub id resolves to a tiny random backbone of the same family
  (:data:`HUB_MODELS` for hub ids the registry does not know); local folders are untouched;
- **the network** — ``kagglehub.dataset_download`` and ``urllib.request.urlopen`` are answered from
  small generated copies of the data sets (:data:`KAGGLE`, :data:`URLS`);
- **files the docs assume you have** (``photos/``, ``query.jpg``, ``~/data/cotton`` ...) are generated
  before the blocks run (:data:`PATHS`); ``$HOME`` is the sandbox's ``home/``;
- **sizes** — every settings load gets :data:`SHRINK` appended (a couple of training steps, small
  batches, in-process decoding), and the quickstart :data:`QUICKSTART` options.

Commands that cannot run here are listed in :data:`NOT_RUN` with the reason (an entry that matches no
command fails the test, so the list stays true); commands needing an optional extra that is not
installed are listed in :data:`NEEDS` and reported as not run. :data:`TEXT` rewrites placeholders
(``RUN/final``) into real paths, :data:`BACKGROUND` starts servers in the background and waits for
them. To cover a new command, add what it needs to these tables; nothing else changes.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TESTS = Path(__file__).resolve().parent

# ---------------------------------------------------------------------------------------------- tables

# hub ids that are not registry sources -> the family of the tiny stand-in (registry names and their
# hub ids are mapped by the registry's own family). The clip and siglip stand-ins are dual encoders
# (image + text tower and a tokenizer: tests/dual_helpers.py), as the hub checkpoints are.
HUB_MODELS = {
    "facebook/dinov2-with-registers-base": "dinov2_with_registers",
    "openai/clip-vit-base-patch16": "clip",
}

# kagglehub handles -> fixture kind (see build_dataset); any other handle fails loudly
KAGGLE = {
    "liucong12601/stanford-online-products-dataset": "sop_kaggle",
    "saeedazfar/customized-cotton-disease-dataset": "imagefolder",
    "OWNER/NAME": "imagefolder",
    "hsankesara/flickr-image-dataset": "flickr_images",  # flickr30k_images/flickr30k_images/*.jpg
    "shtvkumar/karpathy-splits": "karpathy_splits",  # dataset_flickr30k.json
}

# URLs urllib is asked for -> fixture kind; the file is built on first request
URLS = {
    "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/102flowers.tgz": "flowers:102flowers.tgz",
    "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/imagelabels.mat": "flowers:imagelabels.mat",
    "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/setid.mat": "flowers:setid.mat",
    "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar": "voc_tar",
    "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip": "ade_zip",
}

# files and folders the docs take for granted, relative to the sandbox -> fixture kind
PATHS = {
    "photos": "image_folder",
    "queries": "image_folder",
    "new": "image_folder",
    "query.jpg": "image",
    "other.jpg": "image",
    "shoe1.jpg": "image",
    "shoe2.jpg": "image",
    "big.jsonl": "many_records",  # >= 256 images: enough to train an IVF-PQ index
    "more.jsonl": "records",
    "big-test.jsonl": "records",
    "catalogue.jsonl": "many_records",
    "test.jsonl": "records",
    "my_records.jsonl": "records_class_key",
    "labelled.jsonl": "records",
    "queries.txt": "text_lines",
    "captions.txt": "text_lines",
    "products.csv": "products_csv",
    "home/data/cotton": "imagefolder",
    "home/data/Stanford_Online_Products": "sop_root",
    "home/data/roads": "segfolder",
    "data/mine": "prepared_imagefolder",  # recipes/tiny_cpu.yaml's "your own images"
    "runs/shoes": "tiny_model",
    "models/m": "tiny_model",
}

# placeholders in the docs -> what the sandbox has there (plain text replacement, in this order)
TEXT = [
    ("RUN/final", "runs/sop_dinov2_base_lora/final"),
    ("RUN_DIR/final", "runs/sop_dinov2_base_lora/final"),
    ("localhost:8000", "localhost:{port}"),  # a free port: other test runs may serve on 8000
]

# appended to every settings load (as key=value overrides): small and fast, never different code
SHRINK = [
    "train.max_steps=2",
    "train.batch_size=8",
    "train.grad_cache_chunk=null",
    "data.num_workers=0",
    "eval.batch_size=16",
]
QUICKSTART = {"epochs": 1, "images_per_class": 12, "num_layers": 1}

# command (regex on the command, continuation lines joined) -> why it is not run here
NOT_RUN = {
    r"^pip install": "installs packages from the index; .ci/run does exactly this in a fresh venv",
    r"^python -m pytest": "the test suite itself",
    r"^ruff ": "lints the checkout (.ci/run runs it), not the sandbox",
    r"^python -m bench\b(?! --list)": "benchmarks take minutes (the smoke profile about 9 on 2 busy cores) "
    "to hours; --list runs, and test_bench.py tests the runner's machinery",
    r"^python bench/": "benchmarks take minutes to hours (they train many models)",
    r"^accelerate launch .*-m vembed train": "8-GPU training: the same recipe trains on one process in "
    "the block's first line; 2 processes are tested in test_training_distributed.py",
    r"--nnodes=4|--num_machines 4": "a launch across 4 machines (the one-machine form runs, rewritten)",
    r"^RAY_ADDRESS=": "needs a running Ray cluster",
    r"s3://": "needs an S3 bucket",
    r"http://localhost:6333": "needs a running Qdrant server",
    r"^vembed eval segmentation --model RUN/final --data data/voc/val.jsonl \[": "a usage synopsis "
    "(brackets mark optional parts), not a command",
}

# (regex, replacement, why) applied to a command before it runs: the same command on one process
REWRITE = [
    (
        r"^python -m bench --list",
        f"PYTHONPATH={REPO} python -m bench --list",
        "bench/ is a package of the checkout (run from its root), not of the sandbox",
    ),
    (
        r"^torchrun --nproc_per_node=8 -m vembed ",
        "vembed ",
        "run on one process here (8 processes: the 2-process path is tested in test_scale_embed.py)",
    ),
    (
        r"^accelerate launch --multi_gpu --num_processes 8 -m vembed (?=embed|eval)",
        "vembed ",
        "run on one process here (8 GPUs: the 2-process path is tested in test_scale_embed.py)",
    ),
]

# page -> (a command of the block, sandbox paths that block expects not to exist yet): moved aside
# while the block runs, then put back (a guide that repeats a flow another page already ran)
FRESH = {
    "docs/prepare.md": (
        "vembed train --config recipes/sop_dinov2_base_lora.yaml",
        ["runs/sop_dinov2_base_lora"],
    ),
    "docs/segmentation.md": (
        "vembed train --config recipes/voc_dinov2_lora_linear.yaml",
        ["runs/voc_dinov2_lora_linear"],
    ),
}

# command regex -> module that must import (an optional extra); without it the command is not run
NEEDS = {
    r"--engine ray": "ray",
    r"--to lancedb": "lancedb",
    r"--to qdrant": "qdrant_client",
    r"--to parquet|pyarrow\.dataset": "pyarrow",
    r"^vembed serve|^curl .*localhost:8000": "fastapi",
}

# command regex -> (arguments appended, shell that waits until it is up): started in the background,
# stopped when the test module ends
BACKGROUND = {
    r"^vembed serve": (
        " --port {port}",
        "for i in $(seq 120); do curl -sf localhost:{port}/health >/dev/null && break; sleep 1; done",
    ),
}


# ------------------------------------------------------------------------------------------ extraction


@dataclass
class Block:
    file: str
    line: int
    text: str

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"


def extract_blocks(paths=DOCS) -> list[Block]:
    """Every ```bash block of ``paths`` (indented blocks inside lists too), in order."""
    blocks = []
    for path in paths:
        text = path.read_text()
        for m in re.finditer(r"^([ \t]*)```(?:bash|sh|shell)\n(.*?)^[ \t]*```", text, re.S | re.M):
            indent = m.group(1)
            body = "\n".join(
                line[len(indent) :] if line.startswith(indent) else line for line in m.group(2).splitlines()
            )
            blocks.append(Block(str(path.relative_to(REPO)), text[: m.start()].count("\n") + 2, body))
    return blocks


def logical_lines(text: str) -> list[str]:
    """Lines with ``\\``-continuations joined (the unit NOT_RUN and NEEDS patterns match)."""
    out, current = [], ""
    for line in text.splitlines():
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        out.append(current + line)
        current = ""
    if current:
        out.append(current)
    return out


def shell_variables(block: Block) -> str:
    """The ``NAME=value`` lines of a block (kept for the page's later blocks)."""
    return "\n".join(
        line for line in logical_lines(block.text) if re.match(r"^[A-Za-z_]\w*=\S+$", line.strip())
    )


def _command(line: str) -> str:
    return re.sub(r"\s+", " ", line.strip())


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def prepare_script(
    block: Block, sandbox: Path, used: set[str], skipped: list[str], port: int = 8000, before: str = ""
) -> str:
    """The block as a bash script: placeholders replaced, commands not run here commented out (and
    recorded), background commands started and waited for. ``before``: the shell variables the
    file's earlier blocks set (a reader runs a page's blocks in one shell)."""
    lines = [before] if before else []
    for raw in logical_lines(block.text):
        command = _command(raw)
        if not command or command.startswith("#"):
            lines.append(raw)
            continue
        reason = next((why for pat, why in NOT_RUN.items() if re.search(pat, command)), None)
        if reason is not None:
            used.update(pat for pat in NOT_RUN if re.search(pat, command))
            skipped.append(f"{block.id}: {command}  ({reason})")
            lines.append(f": not run here: {reason!r}")
            continue
        missing = [m for pat, m in NEEDS.items() if re.search(pat, command) and not _importable(m)]
        if missing:
            skipped.append(f"{block.id}: {command}  (needs {', '.join(missing)}, not installed)")
            lines.append(": not run: optional extra missing")
            continue
        for pattern, replacement, why in REWRITE:
            if re.search(pattern, command):
                raw = re.sub(pattern, replacement, raw.lstrip())
                skipped.append(f"{block.id}: {command}  ({why})")
        for old, new in TEXT:
            raw = raw.replace(old, new.format(port=port))
        background = next((bg for pat, bg in BACKGROUND.items() if re.search(pat, command)), None)
        if background is not None:
            args, wait = (part.format(port=port) for part in background)
            raw = f"{raw.split(' #')[0].rstrip()}{args} > {sandbox}/background.log 2>&1 &\n"
            raw += f"echo $! >> {sandbox}/background.pids\n{wait}"
        lines.append(raw)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- sandbox


def build_sandbox(root: Path) -> dict:
    """Fixtures, the ``vembed`` and ``python`` on PATH, and the environment for the blocks."""
    import shutil

    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "recipes", root / "recipes")
    for rel, kind in PATHS.items():
        build_fixture(root / rel, kind, root)
    bin_dir = root / "bin"
    bin_dir.mkdir()
    python = sys.executable
    (bin_dir / "vembed").write_text(f'#!/bin/sh\nexec "{python}" "{TESTS / "docs_shim.py"}" "$@"\n')
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{python}" "$@"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    (root / "fixtures.json").write_text(json.dumps({"root": str(root)}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VEMBED_", "PYTEST_"))}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        HOME=str(root / "home"),
        VEMBED_DOCS_SANDBOX=str(root),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        COLUMNS="120",
        PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    )
    return env


def build_fixture(path: Path, kind: str, root: Path) -> Path:
    """Generate one stand-in (small images, records, model folders, data set trees)."""
    from conftest import class_image, make_image_dataset, save_tiny_model

    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "image":
        class_image(1, len(path.name), size=40).save(path)
    elif kind == "image_folder":
        for label in range(3):
            (path / f"class_{label}").mkdir(parents=True, exist_ok=True)
            for i in range(3):
                # unique names across folders: predict-masks writes one flat folder by file name
                class_image(label, i, size=40).save(path / f"class_{label}" / f"{label}_{i}.jpg")
    elif kind in ("records", "records_class_key"):
        images = build_fixture(root / "home" / "images-for-records", "image_folder", root)
        lines = []
        for i, img in enumerate(sorted(images.rglob("*.jpg"))):
            key = "class" if kind == "records_class_key" else "label"
            lines.append(json.dumps({"image": str(img), key: img.parent.name, "category": str(i % 2)}))
        path.write_text("\n".join(lines) + "\n")
    elif kind == "text_lines":
        path.write_text("a red seven\nthe digit two written in blue ink\na picture of a green cat\n")
    elif kind == "many_records":
        folder = root / "home" / f"many-{path.stem}"
        lines = []
        for i in range(300):
            img = folder / f"c{i % 10}" / f"{i}.png"
            img.parent.mkdir(parents=True, exist_ok=True)
            class_image(i % 10, i, size=24).save(img)
            lines.append(json.dumps({"image": str(img), "label": i % 10}))
        path.write_text("\n".join(lines) + "\n")
    elif kind == "products_csv":
        images = build_fixture(root / "home" / "images-for-records", "image_folder", root)
        rows = ["file,sku,department"] + [
            f"{img},{img.parent.name},{i % 2}" for i, img in enumerate(sorted(images.rglob("*.jpg")))
        ]
        path.write_text("\n".join(rows) + "\n")
    elif kind == "imagefolder":
        for label in range(4):
            (path / f"class_{label}").mkdir(parents=True, exist_ok=True)
            for i in range(8):
                class_image(label, i, size=32).save(path / f"class_{label}" / f"{i}.png")
    elif kind == "prepared_imagefolder":
        from vembed.data.prepare import prepare_imagefolder

        tree = build_fixture(root / "home" / "mine-tree", "imagefolder", root)
        prepare_imagefolder(tree, path, seed=0, val_ratio=0.25, test_ratio=0.25)
    elif kind == "sop_root":
        from test_prepare_sop import make_sop_tree

        make_sop_tree(path.parent, train_classes=4, test_classes=2, per_class=3)
    elif kind == "segfolder":
        from vembed.data.shapes import write_shapes

        write_shapes(path, count=8, size=40)
    elif kind == "tiny_model":
        save_tiny_model(path)
    elif kind == "records_dataset":
        make_image_dataset(path)
    else:
        raise AssertionError(f"unknown fixture kind {kind!r} for {path}")
    return path


def build_dataset(kind: str, where: Path) -> Path:
    """What the network would have given: a data set folder (Kaggle) or a file's bytes' path (URL)."""
    where.mkdir(parents=True, exist_ok=True)
    if kind == "sop_kaggle":
        from test_prepare_sop import make_sop_tree

        make_sop_tree(where, train_classes=4, test_classes=2, per_class=3)
        return where
    if kind == "imagefolder":
        return build_fixture(where / "tree", "imagefolder", where)
    if kind == "flickr_images":
        images = where / "flickr30k_images" / "flickr30k_images"
        images.mkdir(parents=True, exist_ok=True)
        for name, img, _captions in flickr_items():
            img.save(images / name)
        (where / "flickr30k_images" / "results.csv").write_text("image_name| comment_number| comment\n")
        return where
    if kind == "karpathy_splits":
        entries = [
            {"filename": name, "split": split, "sentences": [{"raw": c} for c in captions]}
            for (name, _img, captions), split in zip(flickr_items(), FLICKR_SPLITS, strict=True)
        ]
        (where / "dataset_flickr30k.json").write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
        return where
    if kind.startswith("flowers:"):
        from test_prepare_flowers import make_official_files

        folder = where / "flowers"
        if not folder.is_dir():
            make_official_files(folder)
        return folder / kind.split(":", 1)[1]
    if kind == "voc_tar":
        import tarfile

        from test_prepare_segmentation import make_voc

        names = [f"2007_{i:06d}" for i in range(12)]
        make_voc(where / "voc", names=names)
        lists = where / "voc" / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation"
        (lists / "train.txt").write_text("\n".join(names[:9]) + "\n")  # a batch of 8 and more
        (lists / "val.txt").write_text("\n".join(names[9:]) + "\n")
        archive = where / "VOCtrainval.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(where / "voc" / "VOCdevkit", arcname="VOCdevkit")
        return archive
    if kind == "ade_zip":
        import zipfile

        from test_prepare_segmentation import make_ade

        src = make_ade(where / "ade")
        archive = where / "ADEChallengeData2016.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            for p in sorted((src / "ADEChallengeData2016").rglob("*")):
                if p.is_file():
                    zf.write(p, p.relative_to(src))
        return archive
    raise AssertionError(f"unknown data set kind {kind!r}")


FLICKR_SPLITS = ["train"] * 24 + ["restval"] * 4 + ["val"] * 6 + ["test"] * 6


def flickr_items() -> list:
    """``[(file name, image, captions)]``: captioned sklearn digits standing in for Flickr30k's photos
    (the same every call, so the images download and the splits download agree)."""
    from dual_helpers import digit_captions

    items = digit_captions(seed=0, count=len(FLICKR_SPLITS), size=32)
    return [(f"{1000000 + k}.jpg", img, captions) for k, (img, captions, _l, _c) in enumerate(items)]
