"""lorafuse: merge, fuse, route, compress and serve many LoRA adapters on one frozen base LLM.

The public API (see README.md):

- adapters: :class:`LoRA`, :class:`LoRAModule`, :class:`Delta`, :func:`load_lora`,
  :func:`save_lora`, :func:`check_compatible`;
- merging: :func:`merge` (methods in :data:`MERGE_METHODS`), :func:`load_recipe`;
- runtime: :func:`attach`, :func:`detach` and the :class:`AttachedBank` handle whose weights
  may be ``(k,)``, ``(batch, k)`` or ``(batch, seq, k)``;
- routing: :class:`Mixture` / :func:`train_mixture` (softmax and ReMix routers), :class:`ArrowSource`,
  :class:`InstanceMixing` / :func:`train_encoder`, :func:`mode_weights`, :class:`RoutingStats`.
"""

from lorafuse import merge  # a callable package: lorafuse.merge(...) and lorafuse.merge.ties
from lorafuse.adapters import Delta, LoRA, LoRAModule, check_compatible, load_lora, save_lora
from lorafuse.errors import (
    AdapterFormatError,
    CompatibilityError,
    LorafuseError,
    PickleRefusedError,
    UnsupportedAdapterError,
)
from lorafuse.fuse.instance import EncoderConfig, InstanceEncoder, InstanceMixing, mode_weights, train_encoder
from lorafuse.merge import MERGE_METHODS, load_recipe
from lorafuse.route import ArrowSource, Mixture, MixtureConfig, RoutingStats, plot_health, train_mixture
from lorafuse.runtime import AttachedBank, LoRABank, StaticWeights, WeightSource, attach, detach

__version__ = "0.1.0"

__all__ = [  # noqa: RUF022  (issue 7 names at the end)
    "MERGE_METHODS",
    "AdapterFormatError",
    "AttachedBank",
    "CompatibilityError",
    "Delta",
    "LoRA",
    "LoRABank",
    "LoRAModule",
    "LorafuseError",
    "PickleRefusedError",
    "StaticWeights",
    "UnsupportedAdapterError",
    "WeightSource",
    "__version__",
    "attach",
    "check_compatible",
    "detach",
    "load_lora",
    "load_recipe",
    "merge",
    "save_lora",
    "ArrowSource",
    "EncoderConfig",
    "InstanceEncoder",
    "InstanceMixing",
    "Mixture",
    "MixtureConfig",
    "RoutingStats",
    "mode_weights",
    "plot_health",
    "train_encoder",
    "train_mixture",
]
