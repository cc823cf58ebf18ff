"""Training: ``train(settings) -> TrainResult`` (the accelerate loop), checkpoints and resume."""

from vembed.training.loop import StepInfo, TrainingInterrupted, TrainResult, check_settings, train

__all__ = ["StepInfo", "TrainResult", "TrainingInterrupted", "check_settings", "train"]
