"""Property-based tests of every reader: malformed inputs end in a VembedError and nothing else.

One property per reader (records, recipes and overrides, stores, model folders, images, masks). Each
generates files that are valid, nearly valid (a value of the wrong type, a missing key) or damaged
(bytes flipped, cut short, not UTF-8), feeds them to the reader, and accepts either a result or a
:class:`VembedError`: any other exception is the "unexpected ...: this is a bug in vembed" line a
user would have seen. The fast suite runs ``FAST`` examples per reader, ``-m slow`` runs ``SLOW``.
"""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from conftest import save_tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from vembed.errors import VembedError

FAST, SLOW = 200, 3000
SIZES = [FAST, pytest.param(SLOW, marks=pytest.mark.slow)]


def run(examples: int, strategy, check) -> None:
    """Run ``check(value)`` on ``examples`` values drawn from ``strategy``; only VembedError may escape."""

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=examples == FAST,  # the fast suite sees the same inputs every run
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def prop(value):
        try:
            check(value)
        except VembedError as exc:
            assert str(exc).strip(), "a VembedError with no message"
            assert "\n" not in str(exc).strip(), f"not one line: {exc}"

    prop()


# -- generic pieces -------------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def objects(keys: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    """A dict with some of ``keys`` (each with its own likely values, or any JSON value) and maybe junk."""

    def value_for(key):
        return st.one_of(keys[key], json_values)

    return st.lists(st.sampled_from(sorted(keys)), unique=True, max_size=len(keys)).flatmap(
        lambda chosen: st.fixed_dictionaries({key: value_for(key) for key in chosen})
    )


@st.composite
def damaged(draw, data: bytes) -> bytes:
    """``data`` as it is, cut short, with a few bytes changed, inserted or removed, or random bytes."""
    kind = draw(st.sampled_from(["same", "cut", "flip", "insert", "delete", "random", "latin1"]))
    if kind == "same" or not data:
        return data
    if kind == "random":
        return draw(st.binary(max_size=200))
    if kind == "latin1":  # an editor that saved the file as Latin-1
        return data + "café\n".encode("latin-1")
    if kind == "cut":
        return data[: draw(st.integers(0, len(data) - 1))]
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, max(0, len(out) - 1)))
        if kind == "flip" and out:
            out[pos] = draw(st.integers(0, 255))
        elif kind == "insert":
            out[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif out:
            del out[pos]
    return bytes(out)


def jsonl(rows: list) -> bytes:
    return "".join(json.dumps(row, allow_nan=True) + "\n" for row in rows).encode()


# -- records --------------------------------------------------------------------------------------

paths = st.sampled_from(["a.png", "sub/b.png", "missing.png", "", "/abs/x.png", "~/y.png"])
record_row = objects(
    {
        "image": paths,
        "label": st.integers(0, 3) | st.text(max_size=4),
        "category": st.text(max_size=4),
        "resized": paths,
        "mask": paths,
        "query_image": paths,
        "positive": paths,
    }
)
records_file = st.lists(record_row, max_size=5).map(jsonl).flatmap(damaged)


@pytest.mark.parametrize("examples", SIZES)
def test_records_reader(examples, tmp_path):
    from vembed.data.records import read_records

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "sub" / "b.png")
    file = tmp_path / "records.jsonl"

    def check(value):
        data, check_exists, skip_bad, require_label = value
        file.write_bytes(data)
        records = read_records(
            file, check_exists=check_exists, skip_bad=skip_bad, require_label=require_label
        )
        records.images()
        if records.is_segmentation:
            records.masks()

    run(examples, st.tuples(records_file, st.booleans(), st.booleans(), st.booleans()), check)


# -- recipes and overrides -------------------------------------------------------------------------

SECTIONS = {
    "model": ["name", "image_size", "pooling", "projection_dim", "normalize", "dtype", "device"],
    "data": ["train", "val", "batch_size", "num_workers", "skip_bad", "max_image_pixels"],
    "train": ["lr", "epochs", "max_steps", "loss", "method", "augment", "lora", "step_epochs", "precision"],
    "eval": ["k", "batch_size"],
    "index": ["kind", "nlist", "pq_m", "rerank"],
    "export": ["formats"],
}
setting_value = st.one_of(
    json_values, st.sampled_from(["3e-4", "supcon", "lora", "no", "cpu", "1,2", "[1, 2]", "{a: 1}"])
)
recipe_data = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            section: st.one_of(st.dictionaries(st.sampled_from(keys), setting_value, max_size=4), json_values)
            for section, keys in SECTIONS.items()
        },
    ),
    st.dictionaries(  # a vembed-factory flat config
        st.sampled_from(["model_name", "epochs", "batch_size", "use_lora", "loss_type", "lr", "use_mrl"]),
        setting_value,
        max_size=4,
    ),
    json_values,
)
yaml_text = recipe_data.map(lambda d: yaml.safe_dump(d, allow_unicode=True).encode()) | st.sampled_from(
    [b"train: [\n", b"a: b: c\n", b"!!python/object:os.system {}\n", b"\t- x\n", b"train:\n  lr: *x\n"]
)
dotted_keys = st.sampled_from(
    [f"{s}.{k}" for s, keys in SECTIONS.items() for k in keys]
    + ["train", "x.y", ".", "train..lr", "model.name.x"]
)
override = st.one_of(
    st.tuples(dotted_keys, st.text(max_size=10)).map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.text(max_size=16),
)


@pytest.mark.parametrize("examples", SIZES)
def test_recipe_reader(examples, tmp_path):
    from vembed.settings import load_settings

    recipe = tmp_path / "recipe.yaml"

    def check(value):
        data, overrides = value
        recipe.write_bytes(data)
        load_settings(recipe, overrides)

    run(examples, st.tuples(yaml_text.flatmap(damaged), st.lists(override, max_size=3)), check)


# -- stores ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store_dirs(tmp_path_factory):
    """A one-file store and a two-shard store of 6 embeddings, written by hand as vembed writes them."""
    from safetensors.torch import save_file

    from vembed.index.store import STORE_FORMAT, EmbeddingStore, write_store

    root = tmp_path_factory.mktemp("stores")
    meta = {
        "format": STORE_FORMAT,
        "format_version": 2,
        "count": 6,
        "dim": 4,
        "normalize": True,
        "model": {"source": "dinov2-small", "pooling": "cls", "normalize": True},
        "preprocessing": {"image_size": 28, "mean": [0.5] * 3, "std": [0.5] * 3},
    }
    manifest = [{"path": f"/img/{i}.png", "label": i % 2, "category": None} for i in range(6)]
    single = write_store(
        EmbeddingStore(None, torch.randn(6, 4), manifest, dict(meta), torch.randn(1, 4)), root / "single"
    )
    sharded = root / "sharded"
    (sharded / "shards").mkdir(parents=True)
    entries = []
    for part in range(2):
        stem = f"shards/p000-{part:06d}"
        save_file({"embeddings": torch.randn(3, 4)}, str(sharded / f"{stem}.safetensors"))
        (sharded / f"{stem}.jsonl").write_bytes(jsonl(manifest[part * 3 : part * 3 + 3]))
        entries.append({"embeddings": f"{stem}.safetensors", "manifest": f"{stem}.jsonl", "count": 3})
    save_file({"probe": torch.randn(1, 4)}, str(sharded / "probe.safetensors"))
    (sharded / "meta.json").write_text(json.dumps({**meta, "shards": entries, "parts": 1}))
    return {"single": single, "sharded": sharded}


meta_changes = objects(
    {
        "format": st.just("vembed-store"),
        "format_version": st.integers(0, 3),
        "count": st.integers(0, 7),
        "dim": st.integers(0, 5),
        "shards": st.lists(
            objects(
                {
                    "embeddings": st.sampled_from(
                        ["shards/p000-000000.safetensors", "embeddings.safetensors"]
                    ),
                    "manifest": st.sampled_from(["shards/p000-000000.jsonl", "manifest.jsonl", ".."]),
                    "count": st.integers(0, 4),
                }
            ),
            max_size=2,
        ),
        "model": objects(
            {
                "source": st.just("dinov2-small"),
                "pooling": st.just("cls"),
                "projection_dim": st.integers(1, 8),
                "normalize": st.booleans(),
            }
        ),
        "preprocessing": objects({"image_size": st.integers(1, 64), "mean": st.just([0.5] * 3)}),
    }
)
store_damage = st.tuples(
    st.sampled_from(["single", "sharded"]),
    st.sampled_from(["meta.json", "manifest", "embeddings", "probe", "none"]),
    meta_changes,
    st.lists(record_row | objects({"path": st.text(max_size=5), "label": json_values}), max_size=4),
    st.data(),
)


@pytest.mark.parametrize("examples", SIZES)
def test_store_reader(examples, store_dirs, tmp_path):
    from vembed.index.faiss_index import load_index
    from vembed.index.store import model_arguments, open_store, store_shards, store_summary
    from vembed.index.vectors import StoreVectors

    work = tmp_path / "store"

    def check(value):
        which, target, changes, rows, data = value
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(store_dirs[which], work)
        meta = json.loads((work / "meta.json").read_text())
        manifest = work / ("manifest.jsonl" if which == "single" else "shards/p000-000000.jsonl")
        embeddings = work / (
            "embeddings.safetensors" if which == "single" else "shards/p000-000001.safetensors"
        )
        if target == "meta.json":
            text = json.dumps({**meta, **changes}, allow_nan=True).encode()
            (work / "meta.json").write_bytes(data.draw(damaged(text)))
        elif target == "manifest":
            manifest.write_bytes(data.draw(damaged(jsonl(rows) if rows else manifest.read_bytes())))
        elif target == "embeddings":
            embeddings.write_bytes(data.draw(damaged(embeddings.read_bytes())))
        elif target == "probe" and which == "sharded":
            (work / "probe.safetensors").write_bytes(
                data.draw(damaged((work / "probe.safetensors").read_bytes()))
            )
        store_summary(work)
        store_shards(work)
        store = open_store(work)
        model_arguments(store)
        load_index(work, count=len(store), dim=store.dim)
        vectors = StoreVectors(work)  # the memory-mapped reading index build and re-scoring use
        assert np.array_equal(vectors[np.arange(len(vectors))], store.embeddings.numpy())

    run(examples, store_damage, check)


# -- model folders --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from vembed.models.loader import ModelConfig, write_model_config

    folder = save_tiny_model(tmp_path_factory.mktemp("model") / "m")
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"size": {"shortest_edge": 32}, "crop_size": {"height": 28, "width": 28}, "resample": 3})
    )
    write_model_config(folder, ModelConfig(base_model="tiny", pooling="mean", normalize=True, embed_dim=32))
    return folder


sizes = st.integers(-2, 600) | st.sampled_from(["224", "abc"]) | st.lists(st.integers(0, 9), max_size=2)
config_changes = objects(
    {
        "model_type": st.sampled_from(["dinov2", "clip", "siglip", "bert", "dinov3_vit"]),
        "hidden_size": sizes,
        "image_size": sizes,
        "patch_size": sizes,
        "num_register_tokens": sizes,
        "vision_config": objects({"hidden_size": sizes, "image_size": sizes, "patch_size": sizes}),
    }
)
preprocessor_changes = objects(
    {
        "size": sizes | objects({"shortest_edge": sizes, "height": sizes, "width": sizes}),
        "crop_size": sizes | objects({"height": sizes, "width": sizes}),
        "do_center_crop": st.booleans(),
        "resample": st.integers(0, 5),
        "image_mean": st.lists(st.floats(0, 1), min_size=1, max_size=4) | st.floats(0, 1),
        "image_std": st.lists(st.floats(-1, 1), min_size=1, max_size=4) | st.floats(0, 1),
    }
)
vembed_changes = objects(
    {
        "pooling": st.sampled_from(["cls", "mean", "gem", "cls_mean", "xyz"]),
        "projection_dim": st.integers(-1, 64),
        "normalize": st.booleans(),
        "embed_dim": st.integers(-1, 64),
        "truncate_dim": st.integers(-1, 64),
        "num_prefix_tokens": st.integers(-1, 5),
        "lora_targets": st.lists(st.text(max_size=5), max_size=2),
        "preprocessing": objects(
            {
                "image_size": sizes,
                "crop_pct": st.floats(-1, 2),
                "mean": st.lists(st.floats(0, 1), max_size=4),
                "std": st.lists(st.floats(-1, 1), max_size=4),
                "interpolation": st.sampled_from(["bicubic", "bilinear", "nearest", "xyz"]),
                "resize": st.sampled_from(["shorter", "square", "xyz"]),
            }
        ),
        "task_head": objects({"kind": st.sampled_from(["classifier", "xyz"]), "labels": json_values}),
    }
)
model_damage = st.tuples(
    st.sampled_from(["config.json", "preprocessor_config.json", "vembed.json"]),
    st.one_of(config_changes, preprocessor_changes, vembed_changes),
    st.booleans(),  # replace the file's top level entirely
    json_values,
    st.data(),
)


@pytest.mark.parametrize("examples", SIZES)
def test_model_folder_reader(examples, model_dir, tmp_path):
    from vembed.data.images import EvalTransform
    from vembed.models.loader import load_model

    work = tmp_path / "m"
    image = Image.new("RGB", (30, 20), (90, 120, 200))

    def check(value):
        name, changes, replace, top, data = value
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(model_dir, work)
        original = json.loads((work / name).read_text())
        content = top if replace else {**original, **changes}
        (work / name).write_bytes(data.draw(damaged(json.dumps(content, allow_nan=True).encode())))
        loaded = load_model(work, weights=False)
        EvalTransform(loaded.spec)(image)

    run(examples, model_damage, check)


# -- images and masks -----------------------------------------------------------------------------


def encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _samples() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8), "RGB")
    out = {fmt: encoded(rgb, fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")}
    out["RGBA-PNG"] = encoded(rgb.convert("RGBA"), "PNG")
    out["CMYK-JPEG"] = encoded(rgb.convert("CMYK"), "JPEG")
    out["I16-PNG"] = encoded(Image.fromarray(rng.integers(0, 65535, (6, 5)).astype(np.uint16)), "PNG")
    out["P-PNG"] = encoded(rgb.convert("P"), "PNG")
    out["L-PNG"] = encoded(rgb.convert("L"), "PNG")
    out["1-PNG"] = encoded(rgb.convert("1"), "PNG")
    out["F-TIFF"] = encoded(Image.fromarray(rng.random((6, 5)).astype(np.float32), "F"), "TIFF")
    return out


SAMPLES = _samples()
image_bytes = st.sampled_from(sorted(SAMPLES)).flatmap(lambda name: damaged(SAMPLES[name]))


@pytest.mark.parametrize("examples", SIZES)
def test_image_reader(examples, tmp_path):
    from vembed.data.images import EvalTransform, image_size, load_image
    from vembed.models.registry import REGISTRY

    transform = EvalTransform(REGISTRY["dinov2-small"].replace(image_size=28))
    file = tmp_path / "image"

    def check(value):
        data, min_size = value
        file.write_bytes(data)
        image_size(file)
        img = load_image(file, min_size=min_size, max_pixels=10_000)
        assert img.mode == "RGB"
        out = transform(img)
        assert out.shape == (3, 28, 28)

    run(examples, st.tuples(image_bytes, st.none() | st.integers(1, 40)), check)


@pytest.mark.parametrize("examples", SIZES)
def test_mask_reader(examples, tmp_path):
    from vembed.data.images import load_mask

    file = tmp_path / "mask.png"

    def check(data):
        file.write_bytes(data)
        mask = load_mask(file)
        assert mask.dtype == np.uint8 and mask.ndim == 2

    run(examples, image_bytes, check)
