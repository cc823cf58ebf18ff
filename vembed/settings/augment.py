"""``train.augment``: the training-image augmentation settings (a section of :mod:`vembed.settings`)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from vembed.settings.base import Section


def _float_pair(value: Any) -> Any:
    """Accept ``"0.5,1"`` (from the command line) as well as a YAML list."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class AugmentSettings(Section):
    """``train.augment``: what a training image may go through (timm ``create_transform`` style).

    Off by default for retrieval and classification (the evaluation transform): on both real small sets
    measured (docs/training.md) no augmentation was the best default — crops cost the digits 6-13 points
    of Recall@1 and gained the photos at most 2.5. ``true`` (``enabled``) turns on the keys below:
    crops of 90-100 % of the image, no flips, the better augmentation on both sets. Photos of objects
    and scenes can take stronger crops and flips (``scale: [0.35, 1]``, ``hflip: 0.5``, as the SOP
    recipe does). Segmentation is on by default and applies every key (geometry to image and mask,
    colour to the image) with its own defaults: ``scale: null`` (0.5-2x zoom, padded square crop) and
    ``hflip: 0.5``.
    """

    enabled: bool | None = Field(
        None,
        description="true: augment with the keys below; false: the evaluation resize + centre crop; "
        "null: the task's default (off, but for train.task=segmentation).",
    )
    scale: tuple[float, float] | None = Field(
        None,
        description="Random resized crop: share of the image's area, [min, max] (1,1: no crop); null: "
        "the task's default (retrieval's: [0.9, 1]; segmentation's: 0.5-2x zoom and a square crop, "
        "padding ignored).",
    )
    ratio: tuple[float, float] = Field(
        (3 / 4, 4 / 3), description="Random resized crop: aspect ratio range of the crop, [min, max]."
    )
    hflip: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Horizontal flip probability; null: the task's default (0; segmentation's: 0.5).",
    )
    vflip: float = Field(0.0, ge=0, le=1, description="Probability of a vertical flip (aerial, microscopy).")
    color_jitter: float = Field(
        0.0, ge=0, le=1, description="Brightness, contrast and saturation each scaled by 1 ± this (0: off)."
    )
    grayscale: float = Field(0.0, ge=0, le=1, description="Probability of turning the image grey.")

    _split_scale = field_validator("scale", "ratio", mode="before")(_float_pair)

    def with_defaults(self, **defaults: Any) -> AugmentSettings:
        """These settings with a task's defaults for the keys left null (``enabled``, ``scale``, ``hflip``)."""
        update = {key: value for key, value in defaults.items() if getattr(self, key) is None}
        return self.model_copy(update=update)

    def transform_options(self) -> dict[str, Any]:
        """The keywords a training transform takes from these settings (crop scale and ratio, flips,
        colour jitter, greyscale)."""
        return {
            key: getattr(self, key)
            for key in ("scale", "ratio", "hflip", "vflip", "color_jitter", "grayscale")
        }

    @model_validator(mode="before")
    @classmethod
    def _from_bool(cls, value: Any) -> Any:
        """``train.augment: true|false`` (the old switch) still works, as ``enabled``; keys given
        without ``enabled`` turn it on (``augment: {hflip: 0.5}`` augments).

        A dotted key under the boolean keeps it (``recipe_files.set_dotted``).
        """
        if isinstance(value, bool):
            return {"enabled": value}
        if isinstance(value, dict) and value and "enabled" not in value:
            return {"enabled": True, **value}
        return value

    @field_validator("scale")
    @classmethod
    def _scale_range(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not 0 < value[0] <= value[1] <= 1:
            raise ValueError("scale must be [min, max] with 0 < min <= max <= 1")
        return value

    @field_validator("ratio")
    @classmethod
    def _ratio_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1]:
            raise ValueError("ratio must be [min, max] with 0 < min <= max")
        return value
