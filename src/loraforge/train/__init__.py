"""Training: the loop, its loss, and what it writes."""
from loraforge.train.loop import TrainResult, train
from loraforge.train.loss import causal_lm_loss

__all__ = ["TrainResult", "causal_lm_loss", "train"]
