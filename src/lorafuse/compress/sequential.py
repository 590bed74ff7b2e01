"""Layer-by-layer calibration: each decoder layer's Hessians with one layer in memory at a time.

GPTQ pipelines fit large models this way (AutoGPTQ's layer loop, llm-compressor's sequential
pipeline). For the calibration samples ``x_1 … x_n``:

1. build the model's skeleton on the meta device (no weights), materialise only what runs
   before the first decoder layer (embeddings; rotary tables are buffers), and capture layer
   0's inputs for every sample: hidden states ``(1, T, H)`` and the call's other arguments
   (position embeddings, masks) — a pre-hook records them and stops the forward;
2. for each layer ``l``: read its weights from the checkpoint (``safe_open``, tensor by
   tensor), accumulate ``H_m = (1/N) Σ_t x_t x_tᵀ`` (fp64) for each of its linear modules ``m``
   over all samples, hand ``{path: H_m}`` to the caller (who compresses the layer), run the
   layer forward to make layer ``l+1``'s inputs, and free the layer.

Paths are the checkpoint's, which a mixture of experts' differ from the model's
(:mod:`lorafuse.compress.moe`): its fused 3-D expert parameters are read by stacking the
checkpoint's per-expert weights, each expert's projections get the Hessian of the tokens routed
to it (an expert no calibration token reaches gets none), and the router (a ``TopKRouter``, no
``nn.Linear``) that of the MoE block's input, under the checkpoint's name
(``block_sparse_moe.gate`` in Mixtral checkpoints).

Peak memory is one decoder layer + that layer's Hessians (modules reading the same input —
``q/k/v``, ``gate/up`` — share one) + two copies of the calibration activations
``n × T × H``, whatever the depth. At Llama-2-7B width (fp32): a layer is 0.8 GB, its Hessians
1.4 GB (``3 × 4096² + 11008²`` fp64), 128 samples × 512 tokens of activations 1 GB each.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import suppress
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lorafuse._layers import find_decoder_layers
from lorafuse.compress.checkpoint import Checkpoint, ShardReader, open_checkpoint
from lorafuse.compress.moe import (
    ExpertHessians,
    checkpoint_module,
    checkpoint_tensor,
    find_experts,
    fused_experts,
    router_modules,
)
from lorafuse.errors import CompressError


class _Captured(Exception):
    """Raised by the pre-hook on layer 0 once its inputs are recorded (stops the forward)."""


def _materialise(
    model: nn.Module, names: Sequence[str], reader: ShardReader, device: torch.device, dtype: torch.dtype
) -> None:
    """Read the model's parameters ``names`` from the checkpoint (MoE experts stacked from their
    per-expert weights, older checkpoint names mapped: :func:`~lorafuse.compress.moe.checkpoint_tensor`)."""
    from accelerate.utils import set_module_tensor_to_device

    params = dict(model.named_parameters())
    for name in names:
        value = checkpoint_tensor(name, tuple(params[name].shape), reader)
        set_module_tensor_to_device(model, name, device, value=value, dtype=dtype)


class _HessianHooks:
    """Forward pre-hooks accumulating ``Σ x xᵀ`` (fp64) per group of modules sharing an input.

    Groups are found on the first sample: modules whose input is the same tensor object (kept
    alive for that forward, so no address is reused) share one accumulator.
    """

    def __init__(self, layer: nn.Module, prefix: str, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self.paths: dict[nn.Module, str] = {
            m: f"{prefix}.{n}" for n, m in layer.named_modules() if isinstance(m, nn.Linear)
        }
        experts = fused_experts(layer)
        for name, router in router_modules(layer, experts):  # a MoE router reads the block's input
            self.paths[router] = f"{prefix}.{name}"
        self.experts = []
        for name, module in experts:
            found = find_experts(f"{prefix}.{name}", module.gate_up_proj.shape[0], checkpoint)
            if found is not None:
                self.experts.append(ExpertHessians(module, found))
        self.group: dict[str, int] = {}
        self.sums: dict[int, Tensor] = {}
        self.counts: dict[int, int] = {}
        self._first: dict[tuple[int, tuple[int, ...]], tuple[int, Tensor]] = {}
        self._done: set[int] = set()
        self.first_sample = True
        self._hooks = [m.register_forward_pre_hook(self._hook) for m in self.paths]

    def _hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach()
        path = self.paths[module]
        if self.first_sample:
            key = (x.data_ptr(), tuple(x.shape))
            if key not in self._first:
                self._first[key] = (len(self._first), x)
            self.group[path] = self._first[key][0]
        group = self.group[path]
        if group in self._done:
            return
        self._done.add(group)
        flat = x.reshape(-1, x.shape[-1]).double()  # (tokens, in)
        if group not in self.sums:
            self.sums[group] = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float64, device=x.device)
        self.sums[group].addmm_(flat.T, flat)  # in place: no (in, in) temporaries
        self.counts[group] = self.counts.get(group, 0) + flat.shape[0]

    def next_sample(self) -> None:
        self.first_sample, self._first, self._done = False, {}, set()

    def hessians(self) -> dict[str, Tensor]:
        """``{checkpoint module path: H}``: the checkpoint's names (an older checkpoint's router
        name, each expert's projections), not the model's, since the checkpoint is compressed."""
        for h in self._hooks:
            h.remove()
        means = {}
        for group in list(self.sums):  # one fp64 sum freed as each fp32 mean is made
            means[group] = self.sums.pop(group).div_(self.counts[group]).float()
        out = {}
        for path, group in self.group.items():
            out[checkpoint_module(path, self.checkpoint) or path] = means[group]
        for experts in self.experts:
            out |= experts.hessians()
        return out


@torch.no_grad()
def iter_layer_hessians(
    finetuned: str | os.PathLike[str],
    sequences: Sequence[Tensor],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> Iterator[tuple[int, dict[str, Tensor]]]:
    """Yield ``(layer index, {module path: H (in, in)})`` for each decoder layer of ``finetuned``.

    The layer's memory (weights, Hessians) is freed when the caller asks for the next layer, so
    compress the layer's modules inside the loop. ``sequences`` are 1-D token id tensors.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    if not sequences:
        raise CompressError("calibration needs at least one sequence")
    device = torch.device(device)
    checkpoint = open_checkpoint(finetuned)
    config = AutoConfig.from_pretrained(str(finetuned))
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    prefix, layers = find_decoder_layers(model)
    outside = [
        n for n, _ in model.named_parameters() if not n.startswith(prefix + ".") and "lm_head" not in n
    ]
    with ShardReader(checkpoint) as reader:
        _materialise(model, outside, reader, device, dtype)
        for name, buffer in model.named_buffers():
            if buffer.device.type == "meta":
                raise CompressError(f"{finetuned}: buffer {name} is not initialised; cannot calibrate")
        inputs: list[tuple[Tensor, tuple[Any, ...], dict[str, Any]]] = []

        def capture(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            inputs.append((args[0].detach(), args[1:], dict(kwargs)))
            raise _Captured

        hook = layers[0].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            for ids in sequences:
                with suppress(_Captured):
                    model(input_ids=ids.reshape(1, -1).to(device), use_cache=False)
        finally:
            hook.remove()
        for name, _ in list(model.named_parameters()):  # embeddings are not needed any more
            if not name.startswith(prefix + "."):
                set_meta(model, name)
        bar = tqdm(total=len(layers), desc="calibrate (layer by layer)", unit="layer", disable=not progress)
        for index, layer in enumerate(layers):
            layer_prefix = f"{prefix}.{index}"
            _materialise(
                model, [f"{layer_prefix}.{n}" for n, _ in layer.named_parameters()], reader, device, dtype
            )
            hooks = _HessianHooks(layer, layer_prefix, checkpoint)
            outputs = []
            for hidden, args, kwargs in inputs:
                out = layer(hidden, *args, **kwargs)
                outputs.append((out[0] if isinstance(out, tuple) else out, args, kwargs))
                hooks.next_sample()
            hessians = hooks.hessians()
            yield index, hessians
            del hessians, hooks
            layer.to("meta")
            inputs = outputs
            del outputs
            release_freed_memory()
            bar.update()
        bar.close()


def release_freed_memory() -> None:
    """Hand memory freed by the last layer back to the OS (glibc's ``malloc_trim``; elsewhere a no-op).

    glibc keeps freed blocks of a few MB in its heap once its mmap threshold has risen, so
    without this the resident size creeps up layer after layer although nothing is alive.
    """
    if sys.platform != "linux":
        return
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def set_meta(model: nn.Module, name: str) -> None:
    """Replace parameter ``name`` of ``model`` by an empty meta tensor (frees its memory)."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    old = getattr(module, attr)
    module._parameters[attr] = nn.Parameter(torch.empty_like(old, device="meta"), requires_grad=False)
