"""Folders and image paths on stdin are streamed block by block into a store, exactly as they were
listed whole before (same records, order and labels), in bounded memory."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import make_image_dataset, save_tiny_model
from typer.testing import CliRunner

from vembed.cli import app
from vembed.data.records import IMAGE_EXTENSIONS, ImageRecord, records_from_folder
from vembed.errors import VembedError
from vembed.index.blocks import iter_blocks
from vembed.index.shards import job_dir
from vembed.index.store import open_store, store_shards

runner = CliRunner()


def run(*args, code: int = 0, input: str | None = None):
    result = runner.invoke(app, [str(a) for a in args], input=input)
    assert result.exit_code == code, f"exit {result.exit_code}\n{result.stdout}\n{result.stderr}"
    return result


def listed_whole(folder: Path) -> list[ImageRecord]:
    """What a folder source gave before streaming: every image of ``rglob``, sorted, listed at once."""
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    return [ImageRecord(p, p.parent.name if p.parent != folder else None, None, str(p)) for p in paths]


def records_of(blocks) -> list[ImageRecord]:
    return [r for b in blocks for r in b.records]


@pytest.fixture
def tricky(tmp_path) -> Path:
    """A tree whose path order differs from its string order ('a/…' sorts before 'a-x/…' as paths),
    with top-level images (no label), deep ones, other files, a symlinked folder and a hidden one."""
    folder = tmp_path / "tree"
    names = [
        "a/b.jpg", "a-x/c.jpg", "a.jpg", "a/z/y.PNG", "B/q.jpg", "b/q.jpg", ".hidden/x.jpg", ".x.png",
        "a b/c.jpeg", "é/ü.webp", "a/b/c/d/e.tif", "dir.jpg/inner.png", "a0/k.gif", "a_/k.bmp",
        "a/notes.txt", "x.", "z.tiff",
    ]  # fmt: skip
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"")
    os.symlink(folder / "a", folder / "linked")  # not entered (as rglob)
    os.symlink(folder / "a.jpg", folder / "alias.jpg")  # an image (as rglob)
    return folder


def test_a_folder_streams_the_records_it_listed_whole(tricky):
    before = listed_whole(tricky)
    names = [r.image.relative_to(tricky).as_posix() for r in before]
    assert len(names) == 16 and names.index("a/b.jpg") < names.index("a-x/c.jpg")  # not string order
    assert records_from_folder(tricky).records == before
    for size in (1, 3, 16, 100):
        blocks = list(iter_blocks(tricky, size))
        assert records_of(blocks) == before
        assert [len(b.records) for b in blocks[:-1]] == [size] * (len(blocks) - 1)
    relative = Path(os.path.relpath(tricky))
    assert records_of(iter_blocks(relative, 5)) == listed_whole(relative)


def test_a_folder_parses_only_the_blocks_it_owns(tricky, monkeypatch):
    made = []
    real = iter_blocks.__globals__["folder_record"]
    monkeypatch.setitem(iter_blocks.__globals__, "folder_record", lambda *a: made.append(a) or real(*a))
    blocks = list(iter_blocks(tricky, 3, owned=lambda b: b % 2 == 1))
    assert [b.records is None for b in blocks] == [True, False] * 3
    assert records_of(b for b in blocks if b.records) == [
        r for i, r in enumerate(listed_whole(tricky)) if (i // 3) % 2 == 1
    ]
    assert len(made) == 7  # blocks 1, 3 and 5 (one image): the others were only counted


def test_an_empty_folder_is_an_error(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("x")
    with pytest.raises(VembedError, match=r"empty: no images found \(looked for .jpg"):
        list(iter_blocks(tmp_path / "empty", 4))


def test_stdin_is_read_block_by_block_with_its_line_numbers(tricky):
    images = [r.image for r in listed_whole(tricky)]
    text = "\n".join([str(images[0]), "", str(images[1]), "missing.png", str(images[2])]) + "\n"
    with pytest.raises(VembedError, match=r"^<stdin>:4: image not found: missing.png$"):
        list(iter_blocks("-", 2, stdin=io.StringIO(text)))
    blocks = list(iter_blocks("-", 2, stdin=io.StringIO(text), skip_bad=True))
    assert [b.problems for b in blocks] == [[], ["<stdin>:4: image not found: missing.png"]]
    assert [r.image for r in records_of(blocks)] == images[:3]
    assert all(r.label is None for r in records_of(blocks))
    # a block not owned is only counted: its lines are not checked (a resumed job's done shards)
    text = f"gone.png\ngone-too.png\n{images[2]}\n"
    skipped = list(iter_blocks("-", 2, stdin=io.StringIO(text), owned=lambda b: b == 1))
    assert skipped[0].records is None and [r.image for r in skipped[1].records] == [images[2]]
    for empty, skip_bad in (("", False), ("\n \n", False), ("gone.png\n", True)):
        with pytest.raises(VembedError, match=r"^no image paths on stdin \(one path per line\)$"):
            list(iter_blocks("-", 2, stdin=io.StringIO(empty), skip_bad=skip_bad))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    records = make_image_dataset(root / "data", num_classes=2, per_class=6)
    return {"model": save_tiny_model(root / "model"), "records": records, "images": root / "data" / "images"}


def embed(data, source, out, *args, code: int = 0, input: str | None = None):
    common = ("--model", data["model"], "--out", out, "--shard-size", 5, "-q", "data.num_workers=0")
    return run("embed", source, *common, *args, code=code, input=input)


def test_a_folder_store_holds_the_folder_records_in_order(data, tmp_path):
    embed(data, data["images"], tmp_path / "folder")
    embed(data, data["records"], tmp_path / "jsonl")
    store, same = open_store(tmp_path / "folder"), open_store(tmp_path / "jsonl")
    before = listed_whole(data["images"])
    assert store.paths == [str(r.image.resolve()) for r in before] == same.paths
    assert store.labels == [r.label for r in before] == ["class_0"] * 6 + ["class_1"] * 6
    assert [s.count for s in store_shards(store.path)] == [5, 5, 2]
    assert (store.embeddings - same.embeddings).abs().max() < 1e-6


def test_stdin_store_equals_the_store_of_a_jsonl_of_the_same_paths(data, tmp_path):
    images = [str(r.image) for r in listed_whole(data["images"])]
    lines = images[:4] + [str(tmp_path / "missing.png")] + images[4:]
    unlabelled = tmp_path / "paths.jsonl"
    unlabelled.write_text("".join(json.dumps({"image": p}) + "\n" for p in lines))
    embed(data, unlabelled, tmp_path / "jsonl", "--skip-bad")
    result = embed(data, "-", tmp_path / "stdin", "--skip-bad", input="\n".join(lines) + "\n")
    assert f"<stdin>:5: image not found: {tmp_path / 'missing.png'}" in result.stderr
    store, same = open_store(tmp_path / "stdin"), open_store(tmp_path / "jsonl")
    assert store.paths == same.paths == [str(Path(p).resolve()) for p in images]
    assert store.labels == same.labels == [None] * 12
    assert (store.embeddings - same.embeddings).abs().max() < 1e-6
    assert store.meta["num_skipped"] == same.meta["num_skipped"] == 1
    # blocks are cut by lines, as in a JSONL file: the skipped line leaves its shard one short
    assert (
        [s.count for s in store_shards(store.path)] == [s.count for s in store_shards(same.path)] == [4, 5, 3]
    )


def test_stdin_without_a_usable_path_is_an_error_that_leaves_no_job(data, tmp_path):
    out = tmp_path / "store"
    result = embed(data, "-", out, "--skip-bad", input="gone.png\nalso-gone.png\n", code=2)
    assert "no image paths on stdin" in result.stderr
    assert not out.exists() and not job_dir(out).exists()
    result = embed(data, "-", out, input=f"{listed_whole(data['images'])[0].image}\ngone.png\n", code=2)
    assert "<stdin>:2: image not found: gone.png" in result.stderr and not job_dir(out).exists()


MEASURE = """
    import sys, tracemalloc
    from vembed.index.blocks import iter_blocks
    tracemalloc.start()
    n = sum(len(b.records) for b in iter_blocks(sys.argv[1], 2_000))
    print(n, tracemalloc.get_traced_memory()[1] // 2**20)
"""


def peak_memory(source: str, stdin=None) -> tuple[int, int]:
    """(records read, peak MB allocated by Python) streaming ``source`` in blocks of 2000, in a fresh process
    (traced allocations, unlike the peak RSS, do not hide in memory the imports freed)."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(MEASURE), source],
        stdin=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    count, peak_mb = map(int, done.stdout.split())
    return count, peak_mb


def test_a_large_folder_and_stdin_are_read_in_bounded_memory(tmp_path):
    """60 000 images (empty files: listing only checks they exist). Listed whole (before streaming),
    their records took 28-32 MB (folder) and 41 MB (stdin) at the peak; streamed in blocks of 2000, 1-2 MB."""
    folder = tmp_path / "many"
    with open(tmp_path / "paths.txt", "w") as lines:
        for d in range(100):
            sub = folder / f"c{d:03d}"
            sub.mkdir(parents=True)
            for i in range(600):
                os.close(os.open(sub / f"{i:04d}.png", os.O_CREAT | os.O_WRONLY))
                lines.write(f"{sub / f'{i:04d}.png'}\n")
    count, peak_mb = peak_memory(str(folder))
    assert count == 60_000
    assert peak_mb < 10, f"{peak_mb} MB allocated at the peak while streaming a folder"
    with open(tmp_path / "paths.txt") as stdin:
        count, peak_mb = peak_memory("-", stdin=stdin)
    assert count == 60_000
    assert peak_mb < 10, f"{peak_mb} MB allocated at the peak while streaming stdin"
