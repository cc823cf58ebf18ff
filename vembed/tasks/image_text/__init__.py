"""``train.task: image_text``: CLIP / SigLIP dual encoders on image–caption pairs (see ``task.py``)."""

from vembed.tasks.image_text.task import ImageTextTask

__all__ = ["ImageTextTask"]
