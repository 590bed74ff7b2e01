"""The controls the recycling study demands (arXiv 2602.12323) for every learned composition.

- :func:`random_like`: LoRAs with the same shapes and scales whose factors are redrawn from
  ``N(0, σ)``, ``σ`` matching each real factor's std (per module, per factor): a fusion that does
  as well on them learned nothing from the LoRAs' contents.
- A fresh LoRA trained on the same few examples: see :func:`lorafuse.fusion.api.train_fresh_lora`
  (``lorafuse train-lora`` on the command line).
"""

from __future__ import annotations

import torch

from lorafuse.adapters import LoRA, LoRAModule


def random_like(lora: LoRA, seed: int) -> LoRA:
    """A LoRA of the same modules, ranks and scales with Gaussian factors of matching std."""
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for path in sorted(lora.modules):
        m = lora.modules[path]
        a = torch.randn(m.A.shape, generator=generator) * m.A.float().std()  # (r, in)
        b = torch.randn(m.B.shape, generator=generator) * m.B.float().std()  # (out, r)
        modules[path] = LoRAModule(A=a.to(m.A.dtype), B=b.to(m.B.dtype), scale=m.scale)
    return LoRA(
        modules=modules,
        name=f"random_{lora.name or 'lora'}",
        metadata={"control": "random_like", "seed": seed},
    )
