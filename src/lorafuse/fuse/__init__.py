"""Learned composition. For now: the one training loop shared by every learned method."""

from lorafuse._data import encode_examples, encode_text
from lorafuse.fuse.loop import TrainConfig, train_loop

__all__ = ["TrainConfig", "encode_examples", "encode_text", "train_loop"]
