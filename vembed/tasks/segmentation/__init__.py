"""``train.task: segmentation``: a decoder on a backbone's patch tokens, trained with pixel cross-entropy.

The package holds the task's pieces together: ``data`` (image+mask transforms and datasets),
``training`` (the :class:`SegmentationTask` the loop calls: records, model, loss, step runner,
validator), ``masks`` (``vembed predict-masks``), and its evaluation, report and pictures. The model
(:class:`~vembed.models.segmenter.Segmenter` and its saved head) lives in the model layer.
"""

from vembed.tasks.segmentation.training import SegmentationTask

__all__ = ["SegmentationTask"]
