"""lorafuse: merge, fuse, route, compress and serve many LoRA adapters on one frozen base LLM.

The public API (the internals — banks, sources, the serving pool — live in their packages):

- adapters: :class:`LoRA`, :class:`LoRAModule`, :class:`Delta`, :func:`load_lora`,
  :func:`save_lora`, :func:`check_compatible`;
- merging: :func:`merge` (methods in :data:`MERGE_METHODS`), :func:`load_recipe`;
- runtime: :func:`attach`, :func:`detach` and the :class:`AttachedBank` handle whose weights
  may be ``(k,)``, ``(batch, k)`` or ``(batch, seq, k)``;
- learned composition: :func:`fuse` (methods in :data:`FUSION_METHODS`: ``lora-flow``,
  ``cat-weights``, ``lorahub``, ``average``), :class:`Fusion`, :func:`save_fusion`, :func:`load_fusion`;
- compression of fine-tuning deltas: :func:`compress_checkpoint`, :func:`decompress`,
  :func:`load_compressed` (methods in :data:`COMPRESS_METHODS`; more in ``lorafuse.compress``);
- routing: :class:`Mixture` / :func:`train_mixture` (routers in :data:`ROUTINGS`), :class:`ArrowSource`,
  :class:`InstanceMixing` / :func:`train_encoder`, :func:`mode_weights`, :class:`RoutingStats`;
- artefacts: :func:`load` opens any saved folder (LoRA, fusion, mixture, instance encoder,
  :class:`CompressedDelta`) by its header's kind; each class has ``save(dir, *, overwrite=False)``
  and ``load(dir, ...)``; unreadable folders raise :class:`ArtefactError`.
"""

from lorafuse.adapters import Delta, LoRA, LoRAModule, check_compatible, load_lora, save_lora
from lorafuse.artefacts import load
from lorafuse.compress import (
    COMPRESS_METHODS,
    CompressedDelta,
    compress_checkpoint,
    decompress,
    load_compressed,
)
from lorafuse.errors import (
    AdapterFormatError,
    ArtefactError,
    CompatibilityError,
    LorafuseError,
    PickleRefusedError,
    UnsupportedAdapterError,
)
from lorafuse.fusion import FUSION_METHODS, FuseSettings, Fusion, fuse, load_fusion, save_fusion
from lorafuse.fusion.instance import EncoderConfig, InstanceMixing, mode_weights, train_encoder
from lorafuse.merging import MERGE_METHODS, load_recipe, merge
from lorafuse.route import (
    ROUTINGS,
    ArrowSource,
    Mixture,
    MixtureConfig,
    RoutingStats,
    plot_health,
    train_mixture,
)
from lorafuse.runtime import AttachedBank, attach, detach
from lorafuse.train import TrainConfig

__version__ = "0.1.0"

__all__ = [
    "COMPRESS_METHODS",
    "FUSION_METHODS",
    "MERGE_METHODS",
    "ROUTINGS",
    "AdapterFormatError",
    "ArrowSource",
    "ArtefactError",
    "AttachedBank",
    "CompatibilityError",
    "CompressedDelta",
    "Delta",
    "EncoderConfig",
    "FuseSettings",
    "Fusion",
    "InstanceMixing",
    "LoRA",
    "LoRAModule",
    "LorafuseError",
    "Mixture",
    "MixtureConfig",
    "PickleRefusedError",
    "RoutingStats",
    "TrainConfig",
    "UnsupportedAdapterError",
    "__version__",
    "attach",
    "check_compatible",
    "compress_checkpoint",
    "decompress",
    "detach",
    "fuse",
    "load",
    "load_compressed",
    "load_fusion",
    "load_lora",
    "load_recipe",
    "merge",
    "mode_weights",
    "plot_health",
    "save_fusion",
    "save_lora",
    "train_encoder",
    "train_mixture",
]
