"""The built-in skill world: a small base model, skill LoRAs and composite tasks (DESIGN.md)."""

from lorafuse.skillworld.build import PROFILES, build_world, default_world_dir, is_complete
from lorafuse.skillworld.data import COMPOSITES, POOL, SKILLS

__all__ = ["COMPOSITES", "POOL", "PROFILES", "SKILLS", "build_world", "default_world_dir", "is_complete"]
