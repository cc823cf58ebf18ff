"""Image–text pieces: the clip / siglip losses by hand, the captions reader, the dual encoder, the metrics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dual_helpers import save_tiny_dual
from hypothesis import given, settings
from hypothesis import strategies as st

from vembed.data.captions import read_captions
from vembed.errors import VembedError
from vembed.evaluation.image_text import image_text_metrics
from vembed.losses.image_text import ClipLoss, SigLipLoss, build_pair_loss
from vembed.models.dual import DualEncoder, apply_method, load_dual_encoder, save_dual_encoder

# -- losses against a hand computation --------------------------------------------------------------


def _pairs(n=5, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g), dim=1)
    text = F.normalize(torch.randn(n, d, generator=g), dim=1)
    return image, text


def test_clip_loss_is_symmetric_infonce_by_hand():
    image, text = _pairs()
    loss = ClipLoss(temperature=0.1)
    sims = (image @ text.T).numpy().astype(np.float64)
    n = len(sims)
    to_text = -np.mean(
        [10 * sims[i, i] - math.log(sum(math.exp(10 * sims[i, j]) for j in range(n))) for i in range(n)]
    )
    to_image = -np.mean(
        [10 * sims[i, i] - math.log(sum(math.exp(10 * sims[j, i]) for j in range(n))) for i in range(n)]
    )
    assert float(loss(image, text)) == pytest.approx((to_text + to_image) / 2, rel=1e-5)
    assert loss.log_scale.requires_grad and float(loss.scale) == pytest.approx(10.0)


def test_clip_loss_scale_is_capped_at_100_and_learns():
    loss = ClipLoss(temperature=0.001)
    assert float(loss.scale) == pytest.approx(100.0)
    image, text = _pairs()
    fresh = ClipLoss(temperature=0.1)
    fresh(image, text).backward()
    assert fresh.log_scale.grad is not None and float(fresh.log_scale.grad) != 0.0


def test_siglip_loss_is_pairwise_sigmoid_by_hand():
    image, text = _pairs(n=4)
    loss = SigLipLoss(temperature=0.5, bias=-1.5)
    sims = (image @ text.T).numpy().astype(np.float64)
    total = 0.0
    for i in range(4):
        for j in range(4):
            z = 2.0 * sims[i, j] - 1.5
            y = 1.0 if i == j else -1.0
            total += math.log(1 + math.exp(-y * z))  # -log sigmoid(y z)
    assert float(loss(image, text)) == pytest.approx(total / 4, rel=1e-5)
    loss(image, text).backward()
    assert loss.bias.grad is not None and loss.log_scale.grad is not None


def test_pair_loss_by_name_and_its_errors():
    assert isinstance(build_pair_loss("CLIP"), ClipLoss)
    assert isinstance(build_pair_loss("siglip", bias=-5.0), SigLipLoss)
    assert not build_pair_loss("clip", learnable_temperature=False).log_scale.requires_grad
    with pytest.raises(VembedError, match="clip, siglip"):
        build_pair_loss("infonce")
    with pytest.raises(VembedError, match="unknown option 'margin'"):
        build_pair_loss("clip", margin=0.2)
    with pytest.raises(VembedError, match="same shape"):
        ClipLoss()(torch.zeros(3, 4), torch.zeros(2, 4))


# -- the captions reader ----------------------------------------------------------------------------


def _write(tmp_path, rows, name="caps.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_reader_merges_rows_of_one_image_and_lists(tmp_path):
    path = _write(
        tmp_path,
        [
            {"image": "a.png", "text": "a cat"},
            {"image": "b.png", "captions": ["a dog", " two dogs "]},
            {"image": "a.png", "text": "the cat"},
        ],
    )
    found = read_captions(path)
    assert [r.image.name for r in found.records] == ["a.png", "b.png"]
    assert found.records[0].captions == ("a cat", "the cat")
    assert found.records[1].captions == ("a dog", "two dogs")
    assert found.records[0].image == tmp_path / "a.png"
    texts, owners = found.flat_captions()
    assert texts == ["a cat", "the cat", "a dog", "two dogs"] and owners == [0, 0, 1, 1]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"image": "a.png", "text": ""}, "caption 'text' is empty"),
        ({"image": "a.png", "text": "   "}, "caption 'text' is empty"),
        ({"image": "a.png", "text": 3}, "caption 'text' must be a string, got int"),
        ({"image": "a.png", "captions": ["ok", None]}, r"caption 'captions'\[1\] must be a string"),
        ({"image": "a.png", "captions": []}, "non-empty list"),
        ({"image": "a.png"}, "got neither"),
        ({"image": "a.png", "text": "x", "captions": ["y"]}, "not both"),
        ({"text": "x"}, "missing field 'image'"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_reader_errors_name_file_and_line(tmp_path, row, message):
    path = _write(tmp_path, [{"image": "ok.png", "text": "fine"}, row])
    with pytest.raises(VembedError, match=message) as err:
        read_captions(path)
    assert f"{path}:2:" in str(err.value)
    skipped = read_captions(path, skip_bad=True)
    assert len(skipped.records) == 1 and len(skipped.problems) == 1


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a.png", "b.png", "c/d.png"]),
            st.lists(st.text(min_size=0, max_size=6), min_size=0, max_size=3),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_reader_property_good_rows_read_back_bad_rows_rejected(tmp_path_factory, rows):
    """Any rows: all good → every caption read back, grouped by image in order; any bad → the first bad
    row's line named."""
    folder = tmp_path_factory.mktemp("caps")
    lines = [json.dumps({"image": image, "captions": caps}) for image, caps in rows]
    path = folder / "c.jsonl"
    path.write_text("\n".join(lines) + "\n")
    bad = [i for i, (_, caps) in enumerate(rows) if not caps or any(not c.strip() for c in caps)]
    if bad:
        with pytest.raises(VembedError, match=f"c.jsonl:{bad[0] + 1}:"):
            read_captions(path)
        return
    found = read_captions(path)
    expected: dict = {}
    for image, caps in rows:
        expected.setdefault(folder / image, []).extend(c.strip() for c in caps)
    assert {r.image: list(r.captions) for r in found.records} == expected
    assert [r.image for r in found.records] == list(expected)


# -- the metrics ------------------------------------------------------------------------------------


def test_image_text_metrics_by_hand():
    # 3 images; image 0 owns texts 0, 1; image 1 owns text 2; image 2 owns text 3
    images = torch.eye(3)
    texts = F.normalize(
        torch.tensor([[1.0, 0.2, 0.0], [0.0, 0.1, 1.0], [0.0, 1.0, 0.0], [0.9, 0.0, 0.3]]), dim=1
    )
    m = image_text_metrics(images, texts, [0, 0, 1, 2], ks=(1, 5, 10))
    # t2i top-1: text0 -> img0 ok, text1 -> img2 wrong, text2 -> img1 ok, text3 -> img0 wrong
    assert m["t2i_recall@1"] == pytest.approx(2 / 4)
    # i2t top-1: img0 -> text0 ok (1.0 > 0.98); img1 -> text2 ok; img2 -> text1 (0.995) wrong
    assert m["i2t_recall@1"] == pytest.approx(2 / 3)
    assert m["t2i_recall@5"] == m["i2t_recall@10"] == 1.0
    assert m["rsum"] == pytest.approx(100 * (0.5 + 1 + 1 + 2 / 3 + 1 + 1))
    assert m["mean_recall@1"] == pytest.approx((0.5 + 2 / 3) / 2)


# -- the dual encoder -------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["clip", "siglip"])
def tiny_dual(request, tmp_path_factory):
    return save_tiny_dual(tmp_path_factory.mktemp("dual") / request.param, request.param)


def test_dual_encoder_matches_transformers(tiny_dual):
    import transformers

    enc = load_dual_encoder(str(tiny_dual), device="cpu", dtype="float32")
    assert isinstance(enc, DualEncoder)
    model = transformers.AutoModel.from_pretrained(tiny_dual).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_dual)
    pixels = torch.randn(3, 3, 28, 28)
    texts = ["a red two", "the digit nine written in blue ink"]
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels)
        image = image if isinstance(image, torch.Tensor) else image.pooler_output
        padding = "max_length" if enc.spec.family == "siglip" else "longest"
        tokens = tokenizer(texts, padding=padding, max_length=16, return_tensors="pt")
        if enc.spec.family == "siglip":
            tokens.pop("attention_mask")
        tokens.pop("token_type_ids", None)
        text = model.get_text_features(**tokens)
        text = text if isinstance(text, torch.Tensor) else text.pooler_output
    assert torch.allclose(enc.encode(pixels), F.normalize(image, dim=1), atol=1e-6)
    assert torch.allclose(enc.encode_text(texts), F.normalize(text, dim=1), atol=1e-6)
    assert enc.embed_dim == image.shape[1]


@pytest.mark.parametrize(
    ("method", "towers"), [("lora", "both"), ("lora", "text"), ("full", "image"), ("frozen", "both")]
)
def test_method_applies_per_tower(tiny_dual, method, towers):
    enc = apply_method(load_dual_encoder(str(tiny_dual), device="cpu", dtype="float32"), method, towers)
    trainable = [n for n, p in enc.backbone.named_parameters() if p.requires_grad]
    assert trainable
    got = {enc.tower_of(n) for n in trainable}
    assert got == ({"image", "text"} if towers == "both" else {towers})
    assert not any("logit" in n for n in trainable)
    if method == "lora":
        assert all("lora_" in n for n in trainable)
    if method == "frozen":
        heads = enc.towers.image_head + enc.towers.text_head
        assert all(any(n.split("base_model.model.")[-1].startswith(h) for h in heads) for n in trainable)


def test_save_round_trip_loads_back_as_dual_encoder(tiny_dual, tmp_path):
    """Saved, the dual encoder loads back whole, and its image tower alone gives the same image embeddings."""
    from vembed.models.factory import load_embedder

    enc = apply_method(load_dual_encoder(str(tiny_dual), device="cpu", dtype="float32"), "lora", "both")
    for name, p in enc.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)  # adapters that change the output
    out = save_dual_encoder(enc, tmp_path / "saved")
    back = load_dual_encoder(str(out), device="cpu", dtype="float32")
    pixels = torch.randn(2, 3, 28, 28)
    assert torch.allclose(back.encode(pixels), enc.encode(pixels), atol=1e-5)
    assert torch.allclose(back.encode_text(["a red one"]), enc.encode_text(["a red one"]), atol=1e-5)
    vision_only = load_embedder(out, device="cpu", dtype="float32")
    assert not isinstance(vision_only, DualEncoder)
    assert torch.allclose(vision_only.encode(pixels), enc.encode(pixels), atol=1e-5)


def test_vision_only_use_is_unchanged(tiny_dual):
    """A dual model named without a saved vembed.json keeps its vision-tower embedder (as today)."""
    from vembed.models.factory import load_embedder

    emb = load_embedder(str(tiny_dual), device="cpu", dtype="float32")
    assert not isinstance(emb, DualEncoder) and emb.embed_dim == 32


def test_vision_only_model_is_refused_for_text(tmp_path):
    from conftest import save_tiny_model

    folder = save_tiny_model(tmp_path / "dino")
    with pytest.raises(VembedError, match="without a text tower"):
        load_dual_encoder(str(folder), device="cpu")
    clip_vision = save_tiny_model(tmp_path / "clipv", "clip")
    with pytest.raises(VembedError, match="without a text tower"):
        load_dual_encoder(str(clip_vision), device="cpu")


def test_reader_takes_vembed_factory_t2i_and_i2t_rows(tmp_path):
    path = _write(
        tmp_path,
        [
            {"query": "a red chair", "positive": "images/c.jpg"},
            {"query": "images/d.png", "positive": "a dog"},
        ],
    )
    found = read_captions(path)
    assert [(r.image.name, r.captions) for r in found.records] == [
        ("c.jpg", ("a red chair",)),
        ("d.png", ("a dog",)),
    ]


def test_vembed_factory_t2i_config_maps_onto_the_image_text_task(tmp_path):
    from vembed.compat import translate_factory_config

    out, notes = translate_factory_config(
        {
            "model_name_or_path": "openai/clip-vit-base-patch32",
            "retrieval_mode": "t2i",
            "use_lora": True,
            "use_gradient_cache": True,
            "gradient_cache_chunk_size": 128,
            "data_path": "train.jsonl",
        }
    )
    assert out["train"]["task"] == "image_text" and out["train"]["loss"] == "clip"
    assert out["model"]["name"] == "openai/clip-vit-base-patch32" and out["train"]["grad_cache_chunk"] == 128
    assert any("retrieval_mode t2i" in line for line in notes)
    out, _ = translate_factory_config({"retrieval_mode": "i2t", "loss_type": "siglip"})
    assert out["train"]["loss"] == "siglip"
    for mode in ("t2t", "m2i"):
        with pytest.raises(VembedError, match="text-to-text and multimodal"):
            translate_factory_config({"retrieval_mode": mode})
    with pytest.raises(VembedError, match="does not train an image-text dual encoder"):
        translate_factory_config({"retrieval_mode": "t2i", "loss_type": "arcface"})
