"""Errors lorafuse raises on bad input.

Every error says which file, module and shapes are involved and what to do; callers never see a
stack trace from deep inside torch or safetensors for input problems.
"""

from __future__ import annotations


class LorafuseError(Exception):
    """Base class of every error lorafuse raises on purpose."""


class ArtefactError(LorafuseError, ValueError):
    """An artefact folder (adapter, fusion, mixture, encoder, compressed delta) that cannot be read:
    a missing or malformed header, an unknown kind, a version newer than this lorafuse reads."""


class AdapterFormatError(ArtefactError):
    """An adapter folder or file cannot be read: missing, empty, truncated, inconsistent."""


class UnsupportedAdapterError(LorafuseError, ValueError):
    """The adapter is valid PEFT but uses a feature lorafuse does not handle (DoRA, ...)."""


class CompatibilityError(LorafuseError, ValueError):
    """An adapter does not fit a base model (missing modules, shape mismatches)."""


class PickleRefusedError(AdapterFormatError):
    """A pickle-based file (.bin/.pt) was found and the caller did not opt in."""


class CompressError(LorafuseError, ValueError):
    """A fine-tuning delta cannot be compressed or decompressed (shapes, shards, format)."""


class BudgetError(CompressError):
    """The byte budget is too small for the method (not even one singular vector fits, ...)."""


class CheckpointError(LorafuseError, ValueError):
    """A training checkpoint folder that cannot be resumed from (damaged, or another run's)."""


class OutputPathError(LorafuseError, ValueError):
    """An output path would overwrite, delete or write inside one of the command's inputs."""


class OutputExistsError(LorafuseError, FileExistsError):
    """The output exists (or is not a folder) and replacing it was not asked for (``--force``)."""


class UnknownMethodError(LorafuseError, ValueError):
    """A method, routing kind or other registered name that no registry holds."""
