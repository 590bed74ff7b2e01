"""Mixtures of experts in checkpoints and in transformers 5 models: names, weights, Hessians.

A MoE checkpoint stores each expert's projections as 2-D weights, the names depending on the
family, while transformers 5 loads the experts of a layer fused into two 3-D parameters::

    checkpoint (Mixtral)                          model (transformers 5)
    model.layers.L.block_sparse_moe.gate.weight   model.layers.L.mlp.gate.weight  (a TopKRouter)
    ...block_sparse_moe.experts.E.w1.weight ┐
    ...block_sparse_moe.experts.E.w3.weight ┴→    ...mlp.experts.gate_up_proj[E] = [w1; w3]  (2F, H)
    ...block_sparse_moe.experts.E.w2.weight  →    ...mlp.experts.down_proj[E]    = w2        (H, F)

    checkpoint (Qwen2-MoE and its descendants): ...mlp.experts.E.{gate_proj, up_proj, down_proj}

Compression works on the checkpoint's 2-D weights (each expert's ``ΔW`` is a matrix of its own),
so layer-by-layer calibration, which runs the model, must (1) build the fused parameters from the
checkpoint's tensors (:func:`checkpoint_tensor`) and (2) give every checkpoint module its own
input Hessian under its checkpoint name: each expert's from the tokens routed to it
(:class:`ExpertHessians`), the router's from the MoE block's input.

Only the plain layout is handled: ``gate_up_proj`` holding ``[gate; up]`` concatenated (not
interleaved, not transposed), no biases, ``act(gate) * up`` then ``down_proj`` — the layout of
Mixtral, Qwen2/3-MoE, OLMoE and others, checked against the module's own output on the first
sample; experts of another layout keep no Hessian (and are reported uncalibrated).
Memory: a layer's expert Hessians are ``experts × (hidden² + ffn²)`` fp64 values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lorafuse.compress.checkpoint import Checkpoint, ShardReader
from lorafuse.errors import CompressError

RENAMES = ((".mlp.", ".block_sparse_moe."),)  # model path fragment → older checkpoints' (Mixtral)
EXPERT_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))  # gate, up, down


def checkpoint_module(path: str, checkpoint: Checkpoint) -> str | None:
    """The checkpoint's name of the model's module ``path`` (its ``.weight``), or ``None``."""
    for candidate in (path, *(path.replace(a, b) for a, b in RENAMES if a in path)):
        if f"{candidate}.weight" in checkpoint.shapes:
            return candidate
    return None


@dataclass(frozen=True)
class FusedExperts:
    """A fused experts module of the model and the checkpoint's per-expert weights it is made of."""

    module: str  # model path, "model.layers.0.mlp.experts"
    prefix: str  # checkpoint path of the experts, "model.layers.0.block_sparse_moe.experts"
    names: tuple[str, str, str]  # gate, up, down
    count: int

    def path(self, expert: int, part: int) -> str:
        """Checkpoint module path of ``expert``'s gate (0), up (1) or down (2) projection."""
        return f"{self.prefix}.{expert}.{self.names[part]}"

    def build(self, attr: str, reader: ShardReader) -> Tensor:
        """The fused parameter ``attr`` (``gate_up_proj`` or ``down_proj``) from the checkpoint."""
        if attr == "gate_up_proj":
            parts = [
                torch.cat([reader.get(f"{self.path(e, 0)}.weight"), reader.get(f"{self.path(e, 1)}.weight")])
                for e in range(self.count)
            ]
        else:
            parts = [reader.get(f"{self.path(e, 2)}.weight") for e in range(self.count)]
        return torch.stack(parts)


def find_experts(module: str, count: int, checkpoint: Checkpoint) -> FusedExperts | None:
    """The checkpoint's per-expert weights of the model's fused experts ``module``, if it has them."""
    for prefix in (module, *(module.replace(a, b) for a, b in RENAMES if a in module)):
        for names in EXPERT_NAMES:
            wanted = [f"{prefix}.{e}.{n}.weight" for e in range(count) for n in names]
            if all(w in checkpoint.shapes for w in wanted):
                return FusedExperts(module, prefix, names, count)
    return None


def checkpoint_tensor(name: str, shape: tuple[int, ...], reader: ShardReader) -> Tensor:
    """The value of the model's parameter ``name`` read from the checkpoint: the same name, an
    older checkpoint's name of it, or fused experts stacked from per-expert weights."""
    checkpoint = reader.checkpoint
    module, _, attr = name.rpartition(".")
    value = None
    if name in checkpoint.shapes:
        value = reader.get(name)
    elif attr == "weight" and (source := checkpoint_module(module, checkpoint)) is not None:
        value = reader.get(f"{source}.weight")
    elif attr in ("gate_up_proj", "down_proj") and len(shape) == 3:
        experts = find_experts(module, shape[0], checkpoint)
        if experts is not None:
            value = experts.build(attr, reader)
    if value is None:
        raise CompressError(f"{checkpoint.root}: no tensor {name} (nor a known checkpoint name of it)")
    if tuple(value.shape) != tuple(shape):
        raise CompressError(
            f"{checkpoint.root}: the model's {name} is {tuple(shape)} but the checkpoint gives "
            f"{tuple(value.shape)}; its expert layout is not one lorafuse reads"
        )
    return value


def _plain_layout(module: nn.Module) -> bool:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (
        isinstance(gate_up, Tensor)
        and isinstance(down, Tensor)
        and gate_up.ndim == 3
        and down.ndim == 3
        and callable(getattr(module, "act_fn", None))
        and getattr(module, "is_concatenated", True)
        and not getattr(module, "is_transposed", False)
        and not getattr(module, "has_bias", False)
        and getattr(module, "has_gate", True)
        and not getattr(module, "has_post_expert_norm", False)
    )


def fused_experts(layer: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of ``layer``'s sub-modules holding fused 3-D ``gate_up_proj`` / ``down_proj``."""
    found = []
    for name, module in layer.named_modules():
        params = dict(module.named_parameters(recurse=False))
        if (
            params.get("gate_up_proj") is not None
            and params["gate_up_proj"].ndim == 3
            and "down_proj" in params
        ):
            found.append((name, module))
    return found


class ExpertHessians:
    """Per-expert input Hessians of one fused experts module, under the checkpoint's names.

    A forward pre-hook sees the block's tokens ``x (N, H)`` and their routing ``top_k_index (N,
    k)``; for each expert ``e`` the tokens routed to it give ``H_in(e) = Σ x xᵀ`` (shared by its gate
    and up projections) and, through ``h = act(x W_gateᵀ) ⊙ (x W_upᵀ)``, ``H_down(e) = Σ h hᵀ``
    (fp64 sums). On the first sample the recomputed block output is compared with the module's
    own: another layout keeps no Hessian. An expert no token reached gets none either.
    """

    def __init__(self, module: nn.Module, experts: FusedExperts) -> None:
        self.module, self.experts = module, experts
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}
        self.valid = _plain_layout(module)
        self.checked = False
        self._expected: Tensor | None = None
        self._hooks = [
            module.register_forward_pre_hook(self._before, with_kwargs=True),
            module.register_forward_hook(self._after, with_kwargs=True),
        ]

    @staticmethod
    def _inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        names = ("hidden_states", "top_k_index", "top_k_weights")
        values = list(args[:3]) + [kwargs[n] for n in names[len(args[:3]) :]]
        return values[0], values[1], values[2]

    def _add(self, path: str, x: Tensor) -> None:
        flat = x.double()  # (tokens, in)
        if path not in self.sums:
            self.sums[path] = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float64, device=x.device)
        self.sums[path].addmm_(flat.T, flat)  # in place: no (in, in) temporaries
        self.counts[path] = self.counts.get(path, 0) + flat.shape[0]

    def _before(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not self.valid:
            return
        x, index, weights = self._inputs(args, kwargs)
        x = x.detach().reshape(-1, x.shape[-1])  # (N, H)
        expected = torch.zeros_like(x, dtype=torch.float32) if not self.checked else None
        for e in range(self.experts.count):
            routed = index == e  # (N, k)
            tokens = routed.any(-1)
            if not bool(tokens.any()):
                continue
            xe = x[tokens]  # (n_e, H)
            gate, up = nn.functional.linear(xe, module.gate_up_proj[e]).chunk(2, dim=-1)  # (n_e, F) each
            h = module.act_fn(gate) * up  # (n_e, F)
            self._add(self.experts.path(e, 0), xe)
            self._add(self.experts.path(e, 2), h)
            if expected is not None:
                w = (weights[tokens] * routed[tokens]).sum(-1, keepdim=True)  # (n_e, 1)
                expected[tokens] += (nn.functional.linear(h, module.down_proj[e]) * w).float()
        self._expected = expected

    def _after(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        if self._expected is None:
            return
        got = (out[0] if isinstance(out, tuple) else out).detach().reshape(self._expected.shape).float()
        scale = got.abs().max().clamp_min(1e-6)
        if float((got - self._expected).abs().max() / scale) > 1e-3:
            self.valid = False  # not the plain layout: its Hessians would be wrong
            self.sums, self.counts = {}, {}
        self.checked, self._expected = True, None

    def hessians(self) -> dict[str, Tensor]:
        """``{checkpoint module path: H (in, in)}``; removes the hooks."""
        for hook in self._hooks:
            hook.remove()
        if not self.valid:
            return {}
        out = {}
        for e in range(self.experts.count):
            gate_path, down_path = self.experts.path(e, 0), self.experts.path(e, 2)
            if gate_path in self.sums:  # each fp64 sum freed as its fp32 mean is made
                mean = self.sums.pop(gate_path).div_(self.counts[gate_path]).float()
                out[gate_path] = out[self.experts.path(e, 1)] = mean
                out[down_path] = self.sums.pop(down_path).div_(self.counts[down_path]).float()
        self.sums = {}
        return out


def router_modules(layer: nn.Module, experts: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """The routers beside fused experts: a sibling ``gate`` with a 2-D ``weight`` that is no ``nn.Linear``."""
    modules = dict(layer.named_modules())
    found = []
    for name, _ in experts:
        parent = name.rpartition(".")[0]
        router_name = f"{parent}.gate" if parent else "gate"
        router = modules.get(router_name)
        weight = getattr(router, "weight", None)
        if not isinstance(router, nn.Linear) and isinstance(weight, Tensor) and weight.ndim == 2:
            found.append((router_name, router))
    return found
