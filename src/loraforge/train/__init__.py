"""Training: the loop, its loss, and what it writes."""
from loraforge.train.loop import TrainingInterrupted, TrainResult, resume_config, train
from loraforge.train.loss import causal_lm_loss

__all__ = ["TrainResult", "TrainingInterrupted", "causal_lm_loss", "resume_config", "train"]
