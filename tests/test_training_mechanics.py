"""The loop's mechanics: gradient accumulation, gradient cache, P x K batches, pair records, layer-wise lr
decay, the frozen feature cache, mixed precision and gradient checkpointing, bad data."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from training_data import (
    checkpoint_weights,
    make_nuisance_dataset,
    make_pair_dataset,
    max_abs_diff,
    one_thread,
    tiny_settings,
)

from vembed.errors import VembedError
from vembed.losses import build_loss
from vembed.models.factory import create_embedder
from vembed.tasks.retrieval import task as retrieval_task
from vembed.training import checkpoint as ckpt
from vembed.training import steps as steps_module
from vembed.training import train
from vembed.training.data import build_batch_sampler, epoch_batches, read_labelled
from vembed.training.gradcache import grad_cache_backward
from vembed.training.optim import layer_id, param_groups


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mechanics-data")
    return (
        make_nuisance_dataset(root / "train", per_class=4, categories=2),
        make_nuisance_dataset(root / "val", per_class=2, seed=1),
    )


def _last_weights(result):
    return checkpoint_weights(ckpt.latest_checkpoint(result.run_dir))


def _train_rows(result):
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"]


# -- gradient accumulation and gradient cache ----------------------------------------------------------


def test_grad_accumulation_2x8_matches_batch_16(tiny_model, data, tmp_path):
    common = (
        "train.method=full",
        "train.loss=ce",
        # the standardised ce head uses each micro-batch's statistics (as BatchNorm does), which a batch
        # of 16 and two of 8 do not share: the raw linear head makes accumulation exactly a big batch
        "train.loss_options={standardize: false}",
        "train.max_steps=2",
        "train.log_every=1",
        "model.projection_dim=8",
    )
    big = train(
        tiny_settings(tiny_model, data[0], tmp_path / "bs16", *common, "train.batch_size=16"),
        show_progress=False,
    )
    accumulated = train(
        tiny_settings(
            tiny_model, data[0], tmp_path / "bs8x2", *common, "train.batch_size=8", "train.grad_accum=2"
        ),
        show_progress=False,
    )
    assert big.steps == accumulated.steps == 2
    # same images, same loss, same update; float32 summation order differs, and Adam turns that into
    # differences up to a few % of lr on weights whose gradient is ~0 (m / sqrt(v) of noise): 0.1 x lr
    assert max_abs_diff(_last_weights(big), _last_weights(accumulated)) < 1e-4
    for a, b in zip(_train_rows(big), _train_rows(accumulated), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    # while two plain steps of 8 are something else
    two_steps = train(
        tiny_settings(
            tiny_model, data[0], tmp_path / "bs8", *common, "train.batch_size=8", "train.max_steps=4"
        ),
        show_progress=False,
    )
    assert max_abs_diff(_last_weights(big), _last_weights(two_steps)) > 1e-3


def test_gradient_cache_gives_the_full_batch_update(tiny_model, data, tmp_path):
    common = ("train.method=full", "train.loss=infonce", "train.max_steps=2", "train.batch_size=16")
    plain = train(tiny_settings(tiny_model, data[0], tmp_path / "plain", *common), show_progress=False)
    cached = train(
        tiny_settings(tiny_model, data[0], tmp_path / "cached", *common, "train.grad_cache_chunk=5"),
        show_progress=False,
    )
    # same losses, and weights equal up to float summation noise that Adam's m / sqrt(v) amplifies on
    # weights whose gradient is ~0 (measured 1.4e-5 with lr 1e-3): 0.05 x lr
    for a, b in zip(_train_rows(plain), _train_rows(cached), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    assert max_abs_diff(_last_weights(plain), _last_weights(cached)) < 5e-5


def test_gradient_cache_replays_dropout_per_chunk():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.5), nn.Linear(16, 4))
    loss_fn = build_loss("infonce", embed_dim=4)
    x = torch.randn(8, 6)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])

    def embed(inputs):
        return F.normalize(model(inputs), dim=-1)

    # reference: the same chunks, with gradients, concatenated (same dropout masks, same order)
    torch.manual_seed(1)
    loss_fn(torch.cat([embed(c) for c in x.split(3)]), labels).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch.manual_seed(1)
    grad_cache_backward(
        embed,
        x,
        labels,
        loss_fn,
        chunk_size=3,
        backward=lambda loss: loss.backward(),
        no_sync=contextlib.nullcontext,  # there is no DDP here
    )
    for got, want in zip((p.grad for p in model.parameters()), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


# -- batches ---------------------------------------------------------------------------------------------


def test_loop_batches_are_p_by_k(tiny_model, data, tmp_path):
    settings = tiny_settings(tiny_model, data[0], tmp_path / "run", "train.loss=supcon", "train.batch_size=8")
    labelled = read_labelled(settings.data.train, settings, what="training")
    for batch in epoch_batches(build_batch_sampler(labelled, settings.train), 0):
        labels = [labelled.labels[i] for i in batch]
        assert len(batch) == 8 and sorted(labels.count(c) for c in set(labels)) == [4, 4]  # P=2 x K=4

    settings = tiny_settings(
        tiny_model, data[0], tmp_path / "run", "train.batch_size=8", "train.categories_per_batch=1"
    )
    batches = epoch_batches(build_batch_sampler(labelled, settings.train), 0)
    assert batches
    for batch in batches:
        labels = [labelled.labels[i] for i in batch]
        assert sorted(labels.count(c) for c in set(labels)) == [2, 2, 2, 2]  # infonce: P=4 x K=2
        assert len({labelled.categories[i] for i in batch}) == 1


def test_proxy_losses_use_shuffled_batches_by_default(tiny_model, data, tmp_path):
    settings = tiny_settings(
        tiny_model, data[0], tmp_path / "run", "train.loss=arcface", "train.batch_size=8"
    )
    labelled = read_labelled(settings.data.train, settings, what="training")
    batches = epoch_batches(build_batch_sampler(labelled, settings.train), 3)
    seen = sorted(i for b in batches for i in b)
    assert seen == list(range(32))  # each image once per epoch
    assert batches == epoch_batches(
        build_batch_sampler(labelled, settings.train), 3
    )  # a function of the epoch
    assert batches != epoch_batches(build_batch_sampler(labelled, settings.train), 4)


def test_pair_records_train_directly(tiny_model, data, tmp_path):
    pairs = make_pair_dataset(tmp_path / "pairs", num_pairs=16)
    settings = tiny_settings(tiny_model, pairs, tmp_path / "run", "train.max_steps=3", val=data[1])
    labelled = read_labelled(pairs, settings, what="training")
    assert labelled.is_pairs and len(labelled.records) == 32 and labelled.num_classes == 16
    for batch in epoch_batches(build_batch_sampler(labelled, settings.train), 0):
        labels = [labelled.labels[i] for i in batch]
        assert sorted(labels.count(c) for c in set(labels)) == [2, 2, 2, 2]  # 4 pairs per batch of 8
    result = train(settings, show_progress=False)
    assert result.steps == 3 and (result.final_dir / "model.safetensors").is_file()


# -- optimiser -------------------------------------------------------------------------------------------


def test_layer_wise_lr_decay_and_no_decay_groups(tiny_model, tmp_path):
    embedder = create_embedder(str(tiny_model))
    settings = tiny_settings(
        tiny_model, tmp_path, tmp_path, "train.method=full", "train.lr=1.0", "train.layer_decay=0.5"
    )
    head = [("loss.proxies", nn.Parameter(torch.zeros(3, 32)))]
    groups = param_groups(embedder.backbone, head, settings.train)
    lr_of = {}
    decay_of = {}
    names = {id(p): n for n, p in embedder.backbone.named_parameters()}
    names[id(head[0][1])] = head[0][0]
    for group in groups:
        for p in group["params"]:
            lr_of[names[id(p)]] = group["lr"]
            decay_of[names[id(p)]] = group["weight_decay"]
    assert layer_id("embeddings.cls_token", 2) == 0 and layer_id("base_model.model.encoder.layer.1.x", 2) == 2
    assert lr_of["embeddings.patch_embeddings.projection.weight"] == pytest.approx(0.125)  # 0.5 ** 3
    assert all(v == pytest.approx(0.25) for k, v in lr_of.items() if k.startswith("encoder.layer.0."))
    assert all(v == pytest.approx(0.5) for k, v in lr_of.items() if k.startswith("encoder.layer.1."))
    assert lr_of["layernorm.weight"] == pytest.approx(1.0)
    assert lr_of["loss.proxies"] == pytest.approx(10.0)  # head_lr default: 10 x lr
    assert decay_of["embeddings.cls_token"] == 0 and decay_of["layernorm.bias"] == 0
    assert decay_of["embeddings.patch_embeddings.projection.weight"] == pytest.approx(0.05)


# -- methods, precision, checkpointing -------------------------------------------------------------------


def test_frozen_caches_features_once_and_keeps_the_backbone(tiny_model, data, tmp_path, monkeypatch):
    calls = []
    real = steps_module.embed_records
    monkeypatch.setattr(
        steps_module, "embed_records", lambda *a, **k: calls.append(k["pooled"]) or real(*a, **k)
    )
    settings = tiny_settings(
        tiny_model,
        data[0],
        tmp_path / "run",
        "train.method=frozen",
        "model.projection_dim=8",
        "train.epochs=3",
        val=data[1],
    )
    result = train(settings, show_progress=False)
    assert calls == [True, True]  # training and validation features, once for 3 epochs and 4 validations
    assert len(result.history) == 4
    weights = _last_weights(result)
    assert set(weights) == {"projection.weight", "projection.bias"}
    base = create_embedder(str(tiny_model)).backbone.state_dict()
    final = create_embedder(str(result.final_dir))
    assert max_abs_diff(base, final.backbone.state_dict()) == 0


def test_frozen_without_cache_trains_the_same_head(tiny_model, data, tmp_path):
    common = ("train.method=frozen", "model.projection_dim=8", "train.max_steps=3", "train.augment=false")
    cached = train(tiny_settings(tiny_model, data[0], tmp_path / "a", *common), show_progress=False)
    uncached = train(
        tiny_settings(tiny_model, data[0], tmp_path / "b", *common, "train.cache_features=false"),
        show_progress=False,
    )
    assert max_abs_diff(_last_weights(cached), _last_weights(uncached)) < 1e-5


@pytest.mark.parametrize("precision", ["bf16", "no"])
def test_mixed_precision_reaches_the_model(tiny_model, data, tmp_path, monkeypatch, precision):
    seen = []
    real_build = retrieval_task.trainable_embedder

    def build(settings):
        embedder = real_build(settings)
        embedder.backbone.register_forward_hook(
            lambda module, args, out: seen.append(torch.is_autocast_enabled("cpu") and module.training)
        )
        return embedder

    monkeypatch.setattr(retrieval_task, "trainable_embedder", build)
    settings = tiny_settings(
        tiny_model, data[0], tmp_path / "run", "train.max_steps=2", f"train.precision={precision}"
    )
    result = train(settings, show_progress=False)
    assert any(seen) is (precision == "bf16")
    assert all(r["loss"] == r["loss"] for r in _train_rows(result))  # finite
    assert all(v.dtype == torch.float32 for v in _last_weights(result).values())  # fp32 master weights


def test_gradient_checkpointing_recomputes_blocks_with_the_same_result(
    tiny_model, data, tmp_path, monkeypatch
):
    calls = []
    real_build = retrieval_task.trainable_embedder

    def build(settings):
        embedder = real_build(settings)
        embedder.backbone.encoder.layer[0].mlp.register_forward_hook(lambda *args: calls.append(1))
        return embedder

    monkeypatch.setattr(retrieval_task, "trainable_embedder", build)
    common = ("train.method=full", "train.max_steps=2")
    plain = train(tiny_settings(tiny_model, data[0], tmp_path / "a", *common), show_progress=False)
    assert len(calls) == 2
    calls.clear()
    checkpointed = train(
        tiny_settings(tiny_model, data[0], tmp_path / "b", *common, "train.grad_checkpointing=true"),
        show_progress=False,
    )
    assert len(calls) == 4  # each block runs again in backward
    assert max_abs_diff(_last_weights(plain), _last_weights(checkpointed)) < 1e-5


def test_matryoshka_and_learnable_temperature(tiny_model, data, tmp_path):
    settings = tiny_settings(
        tiny_model,
        data[0],
        tmp_path / "run",
        "train.max_steps=3",
        "model.projection_dim=16",
        "train.matryoshka_dims=4,8,16",
        "train.learnable_temperature=true",
        "train.temperature=0.1",
    )
    result = train(settings, show_progress=False)
    weights = _last_weights(result)
    assert float(weights["loss.loss.log_temperature"].exp()) != pytest.approx(0.1, abs=1e-7)


# -- bad data --------------------------------------------------------------------------------------------


def test_bad_image_fails_with_its_file_or_is_skipped(tiny_model, tmp_path):
    train_file = make_nuisance_dataset(tmp_path / "d", per_class=4)
    bad = tmp_path / "d" / "images" / "c3" / "2.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(VembedError, match=r"records\.jsonl:\d+: cannot decode image .*2\.png"):
        train(
            tiny_settings(tiny_model, train_file, tmp_path / "a", "train.max_steps=4", "train.epochs=1"),
            show_progress=False,
        )
    result = train(
        tiny_settings(tiny_model, train_file, tmp_path / "b", "train.max_steps=4", "data.skip_bad=true"),
        show_progress=False,
    )
    assert result.steps == 4


def test_unlabelled_image_records_are_refused(tiny_model, tmp_path):
    records = make_nuisance_dataset(tmp_path / "d", per_class=2)
    lines = records.read_text().splitlines()
    lines[3] = json.dumps({"image": json.loads(lines[3])["image"]})
    records.write_text("\n".join(lines) + "\n")
    with pytest.raises(VembedError, match=r"records\.jsonl:4: missing field 'label'"):
        train(tiny_settings(tiny_model, records, tmp_path / "run"), show_progress=False)


class _PidAndDraw:
    """A training transform that returns the worker's pid and one draw of the item's seeded generator."""

    takes_generator = True

    def __call__(self, image, generator):
        import os

        return torch.tensor([float(os.getpid()), generator.random()], dtype=torch.float64)


def test_training_workers_live_from_epoch_to_epoch_and_read_what_new_ones_would(tmp_path, monkeypatch):
    import os

    from vembed.settings import load_settings
    from vembed.training import data as data_module

    monkeypatch.setattr(data_module, "train_transform", lambda spec, settings: _PidAndDraw())
    root = make_nuisance_dataset(tmp_path / "d", num_classes=2, per_class=4)
    settings = load_settings(None, [f"data.train={root}", "data.num_workers=2", "train.seed=3"])
    data = read_labelled(root, settings, what="training")
    batches = [[0, 1], [2, 3], [4, 5], [6, 7]]

    def read(loader):
        rows = torch.cat([batch.pixel_values for batch in loader])
        return {int(pid) for pid in rows[:, 0]}, rows[:, 1].tolist()

    loaders = data_module.train_loaders(data.records, spec=None, settings=settings)
    pids0, draws0 = read(loaders.epoch(batches, 0))
    pids1, draws1 = read(loaders.epoch(batches, 1))
    assert len(pids0) == 2 and pids1 == pids0 and os.getpid() not in pids0  # the same two workers
    assert draws1 != draws0  # each epoch draws its own augmentations...
    _, resumed = read(loaders.epoch(batches, 1, first=2))
    assert resumed == draws1[4:]  # ...and a resume from batch 2 continues them exactly
    loaders.close()
    for pid in pids0:  # close() stops the workers
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

    in_process = load_settings(None, [f"data.train={root}", "data.num_workers=0", "train.seed=3"])
    fresh = data_module.train_loaders(data.records, spec=None, settings=in_process)
    assert read(fresh.epoch(batches, 0))[1] == draws0 and read(fresh.epoch(batches, 1))[1] == draws1
