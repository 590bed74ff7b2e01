"""Routing among LoRAs: mixtures of LoRA experts (softmax and ReMix routers) and Arrow.

- :class:`Mixture`, :func:`train_mixture`, :class:`MixtureConfig`: n new experts + a router per
  layer (kinds in :data:`ROUTINGS`: ``softmax``, ``remix``), saved and loaded as a folder;
- :class:`ArrowSource`: training-free per-token routing over existing LoRAs;
- :class:`RoutingStats`, :func:`plot_health`: effective experts and top share per layer.
"""

from lorafuse.route import remix, softmax  # noqa: F401  (register the routing kinds)
from lorafuse.route.arrow import ArrowSource, arrow_weights, bank_prototypes
from lorafuse.route.health import RoutingStats, plot_health
from lorafuse.route.mixture import Mixture, MixtureConfig
from lorafuse.route.router import ROUTINGS, Router, RouterSource
from lorafuse.route.train import train_mixture

__all__ = [
    "ROUTINGS",
    "ArrowSource",
    "Mixture",
    "MixtureConfig",
    "Router",
    "RouterSource",
    "RoutingStats",
    "arrow_weights",
    "bank_prototypes",
    "plot_health",
    "train_mixture",
]
