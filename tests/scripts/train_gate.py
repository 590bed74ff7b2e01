"""Train LoRA-Flow gates on the tiny world and save them: run by test_distributed.py with 1 process
(plain python) and with 2 processes (`torchrun --nproc_per_node 2`, the launcher under
`accelerate launch --multi_gpu`; the script's Accelerator joins the gloo process group)."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch
from accelerate import PartialState
from safetensors.torch import save_file

from lorafuse import attach, load_lora
from lorafuse._data import encode_examples
from lorafuse.fusion import flow_for
from lorafuse.fusion.api import FLOW_TRAIN
from lorafuse.skillworld.data import read_jsonl
from lorafuse.skillworld.evaluate import load_world
from lorafuse.train import train


def main(world: Path, out: Path) -> None:
    torch.set_num_threads(1)
    tokenizer, model = load_world(world)
    model.requires_grad_(False)
    handle = attach(
        model, {"lang": load_lora(world / "loras" / "lang_zorb"), "math": load_lora(world / "loras" / "math")}
    )
    flow = flow_for(handle)
    rows = read_jsonl(world / "data" / "math_zorb" / "train.jsonl")[:48]
    config = replace(FLOW_TRAIN, steps=12, batch_size=8, lr=5e-2)
    result = train(
        model,
        flow.parameters(),
        encode_examples(tokenizer, rows),
        config,
        pad_id=tokenizer.pad_token_id,
        progress=False,
    )
    state = PartialState()
    if state.is_main_process:
        save_file(
            {
                "processes": torch.tensor(state.num_processes),
                "weight": flow.gates.weight.detach(),
                "bias": flow.gates.bias.detach(),
                "losses": torch.tensor(result.losses),
            },
            str(out),
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
