"""The one training loop every learned method shares (fusion gates, routers, encoders, world LoRAs)."""

from lorafuse.train.loop import TrainConfig, TrainResult, train, train_loop

__all__ = ["TrainConfig", "TrainResult", "train", "train_loop"]
