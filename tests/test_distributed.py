"""The shared training loop on 2 CPU processes (torchrun, as under `accelerate launch --multi_gpu`)
gives the gate of 1 process.

Each process takes every second example of the same seeded global batches; losses are weighted
by each process's share of completion tokens and gradients summed, so the two runs agree up to
float summation order.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

SCRIPT = Path(__file__).parent / "scripts" / "train_gate.py"


def test_two_processes_train_the_same_gate_as_one(tiny_world: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    subprocess.run([sys.executable, str(SCRIPT), str(tiny_world), str(one)], check=True, env=env, timeout=300)
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
    ]
    subprocess.run([*launch, str(SCRIPT), str(tiny_world), str(two)], check=True, env=env, timeout=300)
    a, b = load_file(str(one)), load_file(str(two))
    assert int(a["processes"]) == 1 and int(b["processes"]) == 2
    assert a["weight"].abs().max() > 1e-3  # the gate moved
    for key in ("weight", "bias", "losses"):
        assert (a[key] - b[key]).abs().max() < 1e-4, (key, (a[key] - b[key]).abs().max())
