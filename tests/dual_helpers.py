"""Tiny CLIP / SigLIP dual encoders built from configs with a word-level tokenizer, and captioned images.

Nothing downloads: the tokenizer is built with the ``tokenizers`` library and saved beside the model, so
``AutoTokenizer.from_pretrained(folder)`` finds it, as it would for a hub checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (40, 60, 230)}
FILLER = [
    "a",
    "an",
    "the",
    "digit",
    "picture",
    "of",
    "in",
    "ink",
    "written",
    "photo",
    "number",
    "handwritten",
]
WORDS = FILLER + NUMBER_WORDS + list(COLOURS) + ["cat", "dog", "chair"]
SPECIAL = ["<pad>", "<unk>", "<bos>"]
EOS = "<eos>"


def build_tokenizer():
    """A lower-casing word-level tokenizer: ``<bos> words <eos>``, ``<pad>`` = 0, ``<eos>`` the last id."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([*SPECIAL, *WORDS, EOS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token=EOS
    )


def save_tiny_dual(path: Path, family: str = "clip", seed: int = 0, image_size: int = 28) -> Path:
    """A 2-layer image tower + 2-layer text tower, random init, saved with its tokenizer."""
    import transformers as tf

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    vocab = len(tokenizer)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    text = dict(
        common,
        vocab_size=vocab,
        max_position_embeddings=16,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=vocab - 1,
    )
    vision = dict(common, image_size=image_size, patch_size=14)
    if family == "clip":
        config = tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
        model = tf.CLIPModel(config)
    elif family == "siglip":
        config = tf.SiglipConfig(text_config=text, vision_config=vision)
        model = tf.SiglipModel(config)
    else:
        raise ValueError(family)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def digit_captions(seed: int = 0, count: int = 300, size: int = 28):
    """sklearn digits drawn in one of three ink colours: ``[(image, [captions]), ...]``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    out = []
    order = rng.permutation(len(digits.images))[:count]
    for i in order:
        label = int(digits.target[i])
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        ink = np.array(COLOURS[colour], dtype=np.float64)
        strength = (digits.images[i] / 16.0)[..., None]
        arr = 255 * (1 - strength) + ink * strength
        img = Image.fromarray(arr.astype(np.uint8), "RGB").resize((size, size), Image.Resampling.NEAREST)
        word = NUMBER_WORDS[label]
        captions = [
            f"a {colour} {word}",
            f"the digit {word} written in {colour} ink",
            f"a picture of a {colour} {word}",
        ]
        out.append((img, captions, label, colour))
    return out


def write_captioned(root: Path, items, name: str, *, one_text: bool = False) -> Path:
    """Images under ``root/images`` and ``root/name`` with ``captions`` (or one ``text``) per row."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for k, (img, captions, label, _colour) in enumerate(items):
        rel = f"images/{name.split('.')[0]}_{k}.png"
        img.save(root / rel)
        row = {"image": rel, "text": captions[0]} if one_text else {"image": rel, "captions": captions}
        row["label"] = NUMBER_WORDS[label]
        lines.append(json.dumps(row))
    path = root / name
    path.write_text("\n".join(lines) + "\n")
    return path


def split_held_out(items):
    """``(train, held_out)``: one held-out image per (digit, colour), so each caption names one image."""
    seen, train, held = set(), [], []
    for item in items:
        key = (item[2], item[3])
        (train if key in seen else held).append(item)
        seen.add(key)
    return train, held


def captioned_digits(root: Path, count: int = 600):
    """``(train.jsonl, held_out.jsonl)`` of captioned digits under ``root``."""
    train, held = split_held_out(digit_captions(seed=0, count=count))
    return write_captioned(root, train, "train.jsonl"), write_captioned(root, held, "held_out.jsonl")


def train_by_hand(settings, epochs: int):
    """The image_text task's parts driven by a bare loop (no scheduler, no checkpoints): the fine-tuned
    model in ``train.output_dir/final`` (for tests of what uses a trained model)."""
    from accelerate import Accelerator

    from vembed.tasks.image_text import ImageTextTask
    from vembed.training.data import epoch_batches

    task = ImageTextTask()
    task.check(settings)
    accelerator = Accelerator(cpu=True)
    parts = task.setup(settings, accelerator, show_progress=False)
    params = [p for p in parts.model.parameters() if p.requires_grad] + list(parts.loss.parameters())
    optimizer = torch.optim.AdamW(params, lr=settings.train.lr)
    _, optimizer = parts.runner.prepare(optimizer)
    for epoch in range(epochs):
        for inputs, labels in parts.runner.micro_batches(epoch, epoch_batches(parts.sampler, epoch), 0):
            parts.runner.forward_backward(inputs, labels)
            optimizer.step()
            optimizer.zero_grad()
    parts.runner.close()
    final = Path(settings.train.output_dir) / "final"
    task.save(final, parts, {"step": epochs})
    return final
