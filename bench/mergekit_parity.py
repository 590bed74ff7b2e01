"""Does lorafuse's merge equal mergekit's (0.1.5) on the same task deltas? Which convention matches?

Two random LoRAs per case (seeded), ``τ_i = s_i B_i A_i`` of one ``96 × 64`` module, LoRA ranks
``(4, 4)`` and ``(8, 16)``, weights ``(1, 1)`` and ``(0.7, 0.3)``, density 0.5. mergekit runs in its
own virtual environment (``--mergekit-python``), on the dense ``τ_i`` as task vectors over a zero
base (``mergekit.merge_methods.api.merge_tensors``); lorafuse runs here on the LoRAs. Compared, as
the largest absolute difference of ``ΔW`` (and that divided by the largest ``|ΔW|`` of the peer):

- lorafuse ``linear`` (exact, its default rank) vs mergekit ``task_arithmetic``;
- lorafuse ``ties`` (``convention`` ``mergekit`` and ``peft``; at full rank ``K = min(out, in)``
  and at the default ``K = max r_i``) vs mergekit ``ties`` (``normalize: true``, its default),
  at ``K = max r_i`` also vs the best rank-K approximation of mergekit's result, and, for the
  ``peft`` convention, vs PEFT's own ``merge_utils.ties``;
- lorafuse ``dare-ties`` (both conventions, full rank, seed 0) vs mergekit's TIES election and
  normalized disjoint merge run on **lorafuse's own drop masks** (a
  ``GeneralizedTaskArithmeticMerge`` with consensus ``sum``, no sparsification, ``normalize:
  true``, fed lorafuse's ``τ̂_i``). mergekit's ``dare_ties`` cannot be compared draw for draw: it
  samples its masks from torch's global generator and, in 0.1.5, rescales the kept entries to the
  L1 norm of ``τ_i`` instead of DARE's ``1/p``, and defaults to ``normalize: false``.

Usage: ``python bench/mergekit_parity.py --mergekit-python /tmp/mk/bin/python`` (mergekit's venv:
``python3 -m venv /tmp/mk && /tmp/mk/bin/pip install torch==2.13.0 mergekit==0.1.5``); writes
``bench/results/mergekit_parity.json`` and ``.md``. Runs in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

RESULTS = Path(__file__).resolve().parent / "results"
OUT, IN = 96, 64
RANKS = [(4, 4), (8, 16)]
WEIGHTS = [(1.0, 1.0), (0.7, 0.3)]
DENSITY = 0.5
PATH = "model.layers.0.self_attn.q_proj"


def worker(folder: Path) -> None:
    """Runs in mergekit's environment: every job of ``jobs.json`` on ``inputs.safetensors``."""
    from importlib.metadata import version

    from mergekit.merge_methods.api import merge_tensors
    from mergekit.merge_methods.generalized_task_arithmetic import (
        ConsensusMethod,
        GeneralizedTaskArithmeticMerge,
    )

    fixed_mask_ties = GeneralizedTaskArithmeticMerge(
        consensus_method=ConsensusMethod.sum,
        sparsification_method=None,
        default_normalize=True,
        default_rescale=False,
        method_name="ties_on_given_masks",
        method_pretty_name=None,
        method_reference_url=None,
    )
    inputs = load_file(str(folder / "inputs.safetensors"))
    outputs = {}
    for job in json.loads((folder / "jobs.json").read_text()):
        taus = [inputs[key] for key in job["inputs"]]  # (out, in) each
        ids = ["base", *(f"t{i}" for i in range(len(taus)))]
        parameters: dict[str, Any] = {"weight": dict(zip(ids[1:], job["weights"], strict=True))}
        if job["density"] is not None:
            parameters["density"] = dict.fromkeys(ids[1:], job["density"])
        method = fixed_mask_ties if job["method"] == "ties_on_given_masks" else job["method"]
        merged = merge_tensors(
            [torch.zeros_like(taus[0]), *taus], method, parameters=parameters, ids=ids, base_index=0
        )  # (out, in): base 0 + merged task vector
        outputs[job["key"]] = merged.contiguous()
    save_file(outputs, str(folder / "outputs.safetensors"))
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mergekit": version("mergekit"),
    }
    (folder / "versions.json").write_text(json.dumps(versions))


def random_lora(seed: int, rank: int) -> Any:
    from lorafuse import LoRA, LoRAModule

    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rank, IN, generator=g) / IN**0.5  # (r, in)
    b = torch.randn(OUT, rank, generator=g) / rank**0.5  # (out, r)
    return LoRA({PATH: LoRAModule(a, b, 2.0)}, name=f"lora{seed}")


def compare(got: torch.Tensor, want: torch.Tensor) -> dict[str, float]:
    diff = (got.double() - want.double()).abs().max().item()
    return {"max_abs_diff": diff, "relative": diff / max(want.abs().max().item(), 1e-30)}


def best_rank(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-``rank`` approximation (Eckart–Young) of ``matrix``, by a full SVD in float64."""
    u, sv, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return (u[:, :rank] * sv[:rank]) @ vh[:rank]  # (out, in)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mergekit-python", default=os.environ.get("MERGEKIT_PYTHON", "/tmp/mk/bin/python"))
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker)
        return

    import peft
    from peft.utils import merge_utils

    import lorafuse
    from lorafuse.merging import merge
    from lorafuse.merging.api import module_generator
    from lorafuse.merging.functional import sparsify

    full = min(OUT, IN)
    cases, inputs, jobs = [], {}, []
    for c, (ranks, weights) in enumerate((r, w) for r in RANKS for w in WEIGHTS):
        loras = [random_lora(10 * c + i, r) for i, r in enumerate(ranks)]
        taus = [lo[PATH].delta() for lo in loras]  # (out, in) each
        generator = module_generator(0, PATH)  # the masks lorafuse's dare-ties draws, in its order
        dropped = [sparsify(t, DENSITY, "random", generator) for t in taus]
        keys = [f"c{c}.tau{i}" for i in range(2)]
        drop_keys = [f"c{c}.dropped{i}" for i in range(2)]
        inputs.update(zip(keys, taus, strict=True))
        inputs.update(zip(drop_keys, dropped, strict=True))
        w = list(weights)
        jobs += [
            {
                "key": f"c{c}.task_arithmetic",
                "method": "task_arithmetic",
                "inputs": keys,
                "weights": w,
                "density": None,
            },
            {"key": f"c{c}.ties", "method": "ties", "inputs": keys, "weights": w, "density": DENSITY},
            {
                "key": f"c{c}.dare",
                "method": "ties_on_given_masks",
                "inputs": drop_keys,
                "weights": w,
                "density": None,
            },
        ]

        def run(method: str, rank: int | None, **params: Any) -> torch.Tensor:
            merged = merge(loras, method, w, rank, progress=False, **params)  # noqa: B023
            return merged[PATH].delta()

        ours = {
            "linear": run("linear", None),
            "ties mergekit K=full": run("ties", full, density=DENSITY, convention="mergekit"),
            "ties peft K=full": run("ties", full, density=DENSITY, convention="peft"),
            "ties mergekit K=max r": run("ties", None, density=DENSITY, convention="mergekit"),
            "ties peft K=max r": run("ties", None, density=DENSITY, convention="peft"),
            "dare-ties mergekit K=full": run(
                "dare-ties", full, density=DENSITY, convention="mergekit", seed=0
            ),
            "dare-ties peft K=full": run("dare-ties", full, density=DENSITY, convention="peft", seed=0),
        }
        peft_ties = merge_utils.ties(taus, torch.tensor(w), DENSITY, "total")
        cases.append({"ranks": list(ranks), "weights": w, "ours": ours, "peft_ties": peft_ties})

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        save_file({k: v.contiguous() for k, v in inputs.items()}, str(folder / "inputs.safetensors"))
        (folder / "jobs.json").write_text(json.dumps(jobs))
        subprocess.run([args.mergekit_python, __file__, "--worker", str(folder)], check=True)
        peer = load_file(str(folder / "outputs.safetensors"))
        peer_versions = json.loads((folder / "versions.json").read_text())

    rows = []
    for c, case in enumerate(cases):
        ours = case["ours"]
        pairs = [
            ("linear", "mergekit task_arithmetic", ours["linear"], peer[f"c{c}.task_arithmetic"]),
            *(
                (name, "mergekit ties", ours[name], peer[f"c{c}.ties"])
                for name in (
                    "ties mergekit K=full",
                    "ties peft K=full",
                    "ties mergekit K=max r",
                    "ties peft K=max r",
                )
            ),
            (
                "ties mergekit K=max r",
                "best rank-K approximation of mergekit ties",
                ours["ties mergekit K=max r"],
                best_rank(peer[f"c{c}.ties"], max(case["ranks"])),
            ),
            ("ties peft K=full", "PEFT merge_utils.ties", ours["ties peft K=full"], case["peft_ties"]),
            *(
                (name, "mergekit ties on lorafuse's DARE masks", ours[name], peer[f"c{c}.dare"])
                for name in ("dare-ties mergekit K=full", "dare-ties peft K=full")
            ),
        ]
        for name, peer_name, got, want in pairs:
            rows.append(
                {
                    "ranks": case["ranks"],
                    "weights": case["weights"],
                    "lorafuse": name,
                    "peer": peer_name,
                    **compare(got, want),
                }
            )

    record = {
        "question": "lorafuse linear / ties / dare-ties (both conventions) vs mergekit on the same deltas",
        "command": "python bench/mergekit_parity.py --mergekit-python /tmp/mk/bin/python",
        "module": [OUT, IN],
        "density": DENSITY,
        "full_rank": full,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "peft": peft.__version__,
            "lorafuse": lorafuse.__version__,
        },
        "mergekit_env": peer_versions,
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mergekit_parity.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        f"lorafuse vs mergekit {peer_versions['mergekit']} on one {OUT}×{IN} module, density {DENSITY}: "
        "max |ΔW_lorafuse − ΔW_peer| (relative to max |ΔW_peer|)",
        "",
        "| LoRA ranks | weights | lorafuse | peer | max abs diff | relative |",
        "| --- | --- | --- | --- | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {tuple(r['ranks'])} | {tuple(r['weights'])} | {r['lorafuse']} | {r['peer']} | "
            f"{r['max_abs_diff']:.2e} | {r['relative']:.2e} |"
        )
    (RESULTS / "mergekit_parity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
