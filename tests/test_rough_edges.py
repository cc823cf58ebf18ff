"""Rough edges a new user hit (issue 22): each case is one clear line, or the behaviour the docs promise.

Messages that used to be "unexpected ...: this is a bug in vembed" (files that are not UTF-8, config
files of the wrong shape, a store listing no shards, a full disk while checkpointing), IVF-PQ on small
stores, and the other numbered items; each test fails on the code before the fix.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_tiny_model
from PIL import Image
from typer.testing import CliRunner

from vembed.cli import app
from vembed.errors import VembedError

runner = CliRunner()


def one_line_error(result, *names: str) -> str:
    """The CLI failed with status 2 and one ``error:`` line naming each of ``names``."""
    out = result.output
    assert result.exit_code == 2, out
    assert "this is a bug" not in out and "Traceback" not in out, out
    lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, out
    text = " ".join(out.split())  # the console may wrap a long line
    for name in names:
        assert name in text, out
    return text


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


# -- files that are not UTF-8 ---------------------------------------------------------------------


def test_records_that_are_not_utf8_name_the_file_and_line(tmp_path, tiny):
    Image.new("RGB", (30, 30)).save(tmp_path / "a.png")
    records = tmp_path / "r.jsonl"
    records.write_bytes(b'{"image": "a.png", "label": 1}\n{"image": "caf\xe9.png", "label": 2}\n')
    text = one_line_error(
        runner.invoke(app, ["embed", str(records), "--model", str(tiny), "--jsonl"]), f"{records}:2"
    )
    assert "UTF-8" in text


def test_a_recipe_that_is_not_utf8_names_the_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"train:\n  lr: 1e-4\n  loss: \xff\n")
    text = one_line_error(runner.invoke(app, ["config", "show", str(recipe)]), f"{recipe}:3")
    assert "UTF-8" in text


def test_store_files_that_are_not_utf8_name_the_file(tmp_path):
    from vembed.index.store import EmbeddingStore, open_store, write_store

    meta = {"format": "vembed-store", "format_version": 2, "count": 2, "dim": 3, "model": {"source": "x"}}
    manifest = [{"path": "/a.png", "label": 0}, {"path": "/b.png", "label": 1}]
    store = write_store(EmbeddingStore(None, torch.randn(2, 3), manifest, meta), tmp_path / "s")
    (store / "manifest.jsonl").write_bytes(b'{"path": "/a.png"}\n{"path": "/\xff.png"}\n')
    with pytest.raises(VembedError, match=r"manifest.jsonl:2: not UTF-8"):
        open_store(store)
    (store / "meta.json").write_bytes(json.dumps(meta).encode()[:-1] + b', "x": "\xe9"}')
    one_line_error(runner.invoke(app, ["index", "info", str(store)]), "meta.json", "UTF-8")


# -- model folders whose config files have the wrong shape ----------------------------------------


@pytest.mark.parametrize(
    "file, content, named",
    [
        ("config.json", [1, 2], "must be a JSON object"),
        ("config.json", "dinov2", "must be a JSON object"),
        ("config.json", {"hidden_size": "32"}, "'hidden_size' must be a positive integer"),
        ("config.json", {"image_size": [28]}, "'image_size'"),
        ("config.json", {"patch_size": {"h": 14}}, "'patch_size'"),
        ("preprocessor_config.json", ["size"], "must be a JSON object"),
        ("preprocessor_config.json", {"size": {"shortest_edge": "256"}}, "'size.shortest_edge'"),
        ("preprocessor_config.json", {"crop_size": [224, 224]}, "'crop_size'"),
        ("preprocessor_config.json", {"image_mean": "imagenet"}, "'image_mean'"),
        ("vembed.json", {"projection_dim": "64"}, "'projection_dim'"),
    ],
)
def test_model_config_of_the_wrong_shape_names_file_and_key(tmp_path, tiny, file, content, named):
    model = tmp_path / "m"
    shutil.copytree(tiny, model)
    if isinstance(content, dict) and (model / file).is_file():
        content = {**json.loads((model / file).read_text()), **content}
    (model / file).write_text(json.dumps(content))
    result = runner.invoke(app, ["embed", str(tmp_path), "--model", str(model), "--out", str(tmp_path / "s")])
    one_line_error(result, str(model / file), named)


# -- a store whose meta.json lists no shards --------------------------------------------------------


def test_a_store_listing_no_shards_says_so(tmp_path):
    from vembed.index.store import EmbeddingStore, write_store

    meta = {"format": "vembed-store", "format_version": 2, "count": 2, "dim": 3, "model": {"source": "x"}}
    store = write_store(
        EmbeddingStore(None, torch.randn(2, 3), [{"path": "/a"}, {"path": "/b"}], meta), tmp_path / "s"
    )
    (store / "meta.json").write_text(json.dumps({**meta, "shards": []}))
    for command in (["index", "info", str(store)], ["index", "build", str(store), "--kind", "flat"]):
        one_line_error(runner.invoke(app, command), "meta.json", "lists no shard")


# -- a full disk while writing a checkpoint ---------------------------------------------------------


def test_a_full_disk_while_checkpointing_says_what_was_kept_and_what_is_needed(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from vembed.training import checkpoint as ckpt

    run = tmp_path / "run"
    model = torch.nn.Linear(64, 32)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 64)).sum().backward()
    optimizer.step()

    def save(step: int) -> None:
        tmp = ckpt.begin(run, step)
        ckpt.write_main(tmp, model_state=model.state_dict(), optimizer=optimizer, state={"step": step})
        ckpt.write_rng(tmp, 0)
        ckpt.commit(tmp, ckpt.checkpoint_dir(run, step), keep=2)

    save(10)
    calls = []

    def full(tensors, filename, metadata=None):
        calls.append(filename)
        Path(filename).write_bytes(b"partial")
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(VembedError) as caught:
        save(20)
    message = str(caught.value)
    assert "no space left" in message and "step-0000020" in message
    assert "step-0000010" in message and "--resume" in message
    weights = sum(p.numel() * 4 for p in model.parameters()) * 3  # weights + two AdamW moments
    assert f"{weights / 1000:.1f} KB" in message
    assert ckpt.list_checkpoints(run) == [ckpt.checkpoint_dir(run, 10)]
    assert not (run / "checkpoints" / ".step-0000020.tmp").exists()  # the partial checkpoint is gone


def test_a_full_disk_during_training_is_one_line_and_keeps_the_earlier_checkpoint(
    tmp_path, tiny, monkeypatch
):
    from conftest import make_image_dataset
    from safetensors import SafetensorError

    from vembed.training import checkpoint as ckpt

    real = ckpt.save_file

    def fills_up(tensors, filename, metadata=None):
        if "step-0000002" in filename:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", fills_up)
    records = make_image_dataset(tmp_path / "data", num_classes=2, per_class=4)
    run = tmp_path / "run"
    args = ["train", "--data", str(records), "--model", str(tiny), "--output-dir", str(run), "-q"]
    args += [
        "train.max_steps=3",
        "train.checkpoint_every=1",
        "train.batch_size=8",
        "train.samples_per_class=4",
    ]
    result = runner.invoke(app, [*args, "data.num_workers=0"])
    one_line_error(result, str(run), "no space left", "step-0000002", "step-0000001", "--resume")
    assert ckpt.list_checkpoints(run) == [ckpt.checkpoint_dir(run, 1)]


# -- item 2: IVF-PQ on small stores -----------------------------------------------------------------


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_ivfpq_on_a_store_under_256_vectors_fits_its_codes(capfd):
    from vembed.index.faiss_index import build_index

    vectors = unit_rows(np.random.default_rng(0).normal(size=(200, 32)))
    index = build_index(vectors, "ivfpq", show_progress=False)
    assert index.info["pq_nbits"] == 7  # 128 codes: 200 vectors cannot train 256
    _, found = index.search(vectors, 1, vectors=vectors)
    assert (found[:, 0] == np.arange(200)).mean() > 0.99
    err = capfd.readouterr().err
    assert "WARNING" not in err  # faiss's own lines are silenced; ours says what was chosen
    assert "index.pq_nbits=7 instead of 8" in err


def test_ivfpq_refuses_a_store_too_small_or_codes_asked_for_explicitly():
    from vembed.index.faiss_index import build_index
    from vembed.settings import IndexSettings

    vectors = unit_rows(np.random.default_rng(0).normal(size=(12, 8)))
    with pytest.raises(VembedError, match="12 vectors is too small for ivfpq.*--kind flat"):
        build_index(vectors, "ivfpq", show_progress=False)
    many = unit_rows(np.random.default_rng(0).normal(size=(200, 8)))
    with pytest.raises(VembedError, match=r"index.pq_nbits=8 needs at least 256 vectors.*pq_nbits=7"):
        build_index(many, "ivfpq", IndexSettings(pq_nbits=8), show_progress=False)


def test_ivfpq_from_the_cli_on_a_small_store(tmp_path):
    from vembed.index.store import EmbeddingStore, write_store

    vectors = unit_rows(np.random.default_rng(1).normal(size=(150, 16)))
    meta = {"format": "vembed-store", "format_version": 2, "count": 150, "dim": 16, "model": {"source": "x"}}
    manifest = [{"path": f"/img/{i}.png"} for i in range(150)]
    store = write_store(EmbeddingStore(None, torch.from_numpy(vectors), manifest, meta), tmp_path / "s")
    result = runner.invoke(app, ["index", "build", str(store), "--kind", "ivfpq"])
    assert result.exit_code == 0, result.output
    assert "WARNING" not in result.output and "bug" not in result.output
    assert json.loads((store / "index.json").read_text())["pq_nbits"] == 7


def test_search_k1_over_ivfpq_rescores_enough_candidates_to_find_an_image_itself():
    """1,800 similar vectors (one narrow domain): k=1 used to re-score only 16 candidates (~80 % found
    themselves first); a minimum depth of 256 finds ~all, and k=1 agrees with k=10's first hit."""
    from vembed.index.faiss_index import build_index

    rng = np.random.default_rng(0)
    vectors = unit_rows(rng.normal(size=(1, 32)) + 0.12 * rng.normal(size=(1800, 32)))
    index = build_index(vectors, "ivfpq", show_progress=False)
    _, one = index.search(vectors, 1, vectors=vectors)
    _, ten = index.search(vectors, 10, vectors=vectors)
    assert (one[:, 0] == np.arange(1800)).mean() >= 0.99
    assert (one[:, 0] == ten[:, 0]).all()


# -- item 4: DataLoader workers ---------------------------------------------------------------------


class _BadItems(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        raise VembedError(f"cannot decode image /data/bad-{index}.png: truncated")


def test_a_vembed_error_in_a_dataloader_worker_keeps_its_one_line_message():
    from vembed.data.datasets import build_loader

    loader = build_loader(_BadItems(), batch_size=2, num_workers=1, collate_fn=lambda items: items)
    with pytest.raises(VembedError) as caught:
        next(iter(loader))
    assert str(caught.value) == "cannot decode image /data/bad-0.png: truncated"


def test_a_bad_image_in_training_with_workers_prints_the_one_line(tmp_path, tiny):
    from conftest import make_image_dataset

    records = make_image_dataset(tmp_path / "data", num_classes=2, per_class=4)
    bad = tmp_path / "data" / "images" / "class_1" / "img_2.png"
    bad.write_bytes(b"not an image")
    args = ["train", "--data", str(records), "--model", str(tiny), "--output-dir", str(tmp_path / "run")]
    args += [
        "train.max_steps=2",
        "data.num_workers=1",
        "train.batch_size=8",
        "train.samples_per_class=4",
        "-q",
    ]
    result = runner.invoke(app, args)
    text = one_line_error(result, str(bad))
    assert "DataLoader worker" not in text and "Original Traceback" not in text


def test_ctrl_c_in_a_dataloader_worker_is_left_to_the_main_process():
    """Workers forked while the handler is installed used to say the SIGINT line too."""
    import os
    import signal

    from vembed.training.callbacks import StopSignal

    with StopSignal() as stop:
        child = os.fork()
        if child == 0:  # a worker: the terminal's Ctrl-C reaches it as well
            try:
                os.kill(os.getpid(), signal.SIGINT)
                os._exit(0 if stop.signal is None else 1)
            except BaseException:
                os._exit(2)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert stop.signal is None
        os.kill(os.getpid(), signal.SIGINT)  # the main process still stops the run
        assert stop.signal == "SIGINT"


# -- item 5: a hub id with no network ---------------------------------------------------------------


def test_an_unreachable_hub_is_said_at_once(tmp_path, monkeypatch):
    """Only the network boundary is mocked: every TCP connection is refused. The hub client used to
    retry five times (``Retrying in 8s [Retry 5/5]``) before any message; a sleep now fails the test."""
    import socket
    import time

    from huggingface_hub import constants

    from vembed.models import loader

    Image.new("RGB", (30, 30)).save(tmp_path / "a.png")
    attempts = []

    def refused(address, *args, **kwargs):
        attempts.append(address)
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(socket, "create_connection", refused)
    monkeypatch.setattr(time, "sleep", lambda seconds: pytest.fail(f"retried after {seconds} s"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    forget = getattr(getattr(loader, "hub_reachable", None), "cache_clear", lambda: None)  # once a process
    forget()
    try:
        result = runner.invoke(
            app, ["embed", str(tmp_path / "a.png"), "--model", "someorg/some-vit", "--jsonl"]
        )
    finally:
        forget()
    text = one_line_error(result, "'someorg/some-vit'", "unreachable", "HF_HUB_OFFLINE=1", "local cache")
    assert len(attempts) == 1, attempts  # one quick attempt, no retries
    assert "Retrying" not in text


# -- item 6: two embeds into one store at once ------------------------------------------------------


def test_a_second_embed_into_a_store_being_written_names_the_writing_process(tmp_path, tiny):
    import socket
    import subprocess
    import sys

    from vembed.index.shards import lock_file

    Image.new("RGB", (30, 30), (200, 10, 10)).save(tmp_path / "a.png")
    Image.new("RGB", (30, 30), (10, 200, 10)).save(tmp_path / "b.png")
    store = tmp_path / "store"
    base = ["embed", "--model", str(tiny), "--out", str(store), "-q"]
    assert runner.invoke(app, ["embed", str(tmp_path / "a.png"), *base[1:]]).exit_code == 0
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        host = socket.gethostname().split(".")[0]
        lock_file(store).write_text(f"{host} {writer.pid}\n")  # the first embed, still running
        result = runner.invoke(app, ["embed", str(tmp_path / "b.png"), *base[1:], "--append"])
        text = one_line_error(result, f"another process (pid {writer.pid})", str(store))
        assert "unfinished embed" not in text
        assert lock_file(store).read_text() == f"{host} {writer.pid}\n"  # not taken from its holder
    finally:
        writer.kill()
        writer.wait()
    # the writer is gone (killed): its lock is taken over, the append runs and lets the lock go
    result = runner.invoke(app, ["embed", str(tmp_path / "b.png"), *base[1:], "--append"])
    assert result.exit_code == 0, result.output
    assert not lock_file(store).exists()
    assert json.loads((store / "meta.json").read_text())["count"] == 2


# -- item 7: train.epochs on the command line over a recipe's train.max_steps -----------------------


def test_epochs_given_on_the_command_line_win_over_the_recipes_max_steps(capsys):
    from vembed.settings import load_settings

    recipe = Path(__file__).parent.parent / "recipes" / "tiny_cpu.yaml"
    assert load_settings(recipe).train.max_steps == 300
    train = load_settings(recipe, ["train.lr=3e-4", "train.epochs=1"]).train
    assert (train.epochs, train.max_steps, train.lr) == (1, None, 3e-4)
    err = " ".join(capsys.readouterr().err.split())
    assert "train.epochs=1 given on the command line" in err and "train.max_steps=300 is dropped" in err
    both = load_settings(recipe, ["train.epochs=1", "train.max_steps=20"]).train
    assert (both.epochs, both.max_steps) == (1, 20)
    assert load_settings(recipe, ["train.lr=1e-4"]).train.max_steps == 300
    assert load_settings(recipe, values={"train.epochs": 2}).train.max_steps is None  # a flag is typed too


# -- item 9: small things a new user trips on --------------------------------------------------------


def test_a_folder_given_as_data_says_which_records_files_it_holds(tmp_path, tiny):
    from conftest import make_image_dataset

    prepared = tmp_path / "data" / "p"
    prepared.mkdir(parents=True)
    for name in ("train", "val", "test"):
        (prepared / f"{name}.jsonl").write_text("")
    result = runner.invoke(app, ["train", "--data", str(prepared), "--model", str(tiny), "-q"])
    one_line_error(
        result, f"{prepared}: is a folder", "train.jsonl, val.jsonl", str(prepared / "train.jsonl")
    )
    result = runner.invoke(app, ["eval", "retrieval", "--model", str(tiny), "--data", str(prepared)])
    one_line_error(result, "is a folder", str(prepared / "train.jsonl"))
    images = make_image_dataset(tmp_path / "photos", num_classes=2, per_class=2).parent / "images"
    result = runner.invoke(app, ["eval", "retrieval", "--model", str(tiny), "--data", str(images)])
    one_line_error(result, "is a folder of images", f"vembed prepare imagefolder {images}")


def test_a_csv_without_the_label_column_is_said_once(tmp_path):
    Image.new("RGB", (30, 30)).save(tmp_path / "a.png")
    table = tmp_path / "t.csv"
    table.write_text("image,labels\n" + "".join(f"a.png,c{i % 2}\n" for i in range(10)))
    result = runner.invoke(app, ["prepare", "csv", str(table), "--out", str(tmp_path / "out")])
    text = one_line_error(result, str(table), "no 'label' column", "'image', 'labels'", "--label-key labels")
    assert "--skip-bad" not in text


def test_embed_checks_the_source_before_loading_the_model(tmp_path, tiny, monkeypatch):
    import vembed.models.factory as factory

    monkeypatch.setattr(factory, "create_embedder", lambda *a, **k: pytest.fail("the model was loaded first"))
    result = runner.invoke(
        app, ["embed", str(tmp_path / "typo"), "--model", str(tiny), "--out", str(tmp_path / "s")]
    )
    one_line_error(result, f"source not found: {tmp_path / 'typo'}")


def test_prepare_imagefolder_says_which_val_and_test_classes_have_one_image(tmp_path):
    from conftest import make_image_dataset

    images = make_image_dataset(tmp_path / "photos", num_classes=3, per_class=5).parent / "images"
    args = ["prepare", "imagefolder", str(images), "--out", str(tmp_path / "out")]
    result = runner.invoke(app, [*args, "--val-ratio", "0.2", "--test-ratio", "0.2"])
    assert result.exit_code == 0, result.output
    assert "single-image-in-split" in result.output
    problems = (tmp_path / "out" / "problems.txt").read_text().splitlines()
    for name in ("val", "test"):
        records = [json.loads(line) for line in (tmp_path / "out" / f"{name}.jsonl").read_text().splitlines()]
        labels = [row["label"] for row in records]
        alone = [label for label in dict.fromkeys(labels) if labels.count(label) == 1]
        assert alone  # 5 images per class, 20 % each: some class has one image in val and in test
        said = [line for line in problems if line.startswith(f"single-image-in-split\t{name}: ")]
        assert len(said) == 1 and f"{len(alone)} class(es) with only one image here" in said[0]
        assert all(label in said[0] for label in alone) and f"--{name}-ratio" in said[0]


def test_a_batch_larger_than_the_training_set_gets_a_note():
    from vembed.settings import load_settings
    from vembed.training.state import TrainState, plan

    train = load_settings(None, ["train.batch_size=128", "train.epochs=2"]).train
    message = plan(train, TrainState(total_steps=2, steps_per_epoch=1), 1, 80)
    assert "an epoch is 1 step, 128 of the 80 training images" in message
    assert "a batch of 128 images is more than the whole training set (80 images)" in message
    assert "train.batch_size of at most 80" in message
    assert "note" not in plan(train, TrainState(total_steps=20, steps_per_epoch=10), 1, 1280)


def test_search_with_one_query_says_query(tmp_path, tiny):
    for i, colour in enumerate([(200, 10, 10), (10, 200, 10), (10, 10, 200)]):
        Image.new("RGB", (30, 30), colour).save(tmp_path / f"{i}.png")
    store = tmp_path / "store"
    (tmp_path / "photos").mkdir()
    for i in range(3):
        shutil.move(tmp_path / f"{i}.png", tmp_path / "photos" / f"{i}.png")
    assert (
        runner.invoke(
            app, ["embed", str(tmp_path / "photos"), "--model", str(tiny), "--out", str(store), "-q"]
        ).exit_code
        == 0
    )
    result = runner.invoke(app, ["search", str(store), str(tmp_path / "photos" / "0.png"), "--k", "1"])
    assert result.exit_code == 0, result.output
    assert "searched 1 query against 3 images" in " ".join(result.output.split())
