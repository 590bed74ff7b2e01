"""Seeing the gate: per-token, per-layer LoRA-Flow weights of a generated answer, as HTML and a heatmap.

The answer is generated greedily (KV cache on); the weights are then read in one teacher-forced
pass over the whole sequence (a causal model gives every position the weights it had while
decoding). The page colours each token by the weight of a chosen LoRA at a chosen layer (or the
mean over layers); hovering shows every weight. The PNG shows, per LoRA, layers × tokens.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lorafuse._data import decode, tokenize
from lorafuse._io import OutputInputs, check_output_path, write_text_atomic
from lorafuse.errors import LorafuseError
from lorafuse.fusion.flow import LoRAFlow


@dataclass
class Explanation:
    tokens: list[str]  # every token of prompt + answer (``<s>`` first)
    prompt_length: int  # tokens that belong to the prompt (``<s>`` included)
    weights: Tensor  # (layers, T, k)
    lora_names: list[str]
    answer: str


@torch.no_grad()
def explain(
    model: nn.Module,
    tokenizer: Any,
    flow: LoRAFlow,
    lora_names: list[str],
    prompt: str,
    *,
    max_new_tokens: int = 64,
) -> Explanation:
    """Generate an answer to ``prompt`` with the installed fusion and collect its weights per token."""
    device = next(model.parameters()).device
    prompt_ids = [tokenizer.bos_token_id, *tokenize(tokenizer, prompt)]
    ids = torch.tensor([prompt_ids], device=device)  # (1, T0)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        use_cache=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )[0].tolist()
    answer_ids = out[len(prompt_ids) :]
    if tokenizer.eos_token_id in answer_ids:
        answer_ids = answer_ids[: answer_ids.index(tokenizer.eos_token_id) + 1]
    full = prompt_ids + answer_ids
    flow.record = []
    try:
        model(input_ids=torch.tensor([full], device=device))
        recorded = list(flow.record)
    finally:
        flow.record = None
    if not recorded:
        raise LorafuseError("the fusion recorded no gate weights; is a LoRA-Flow fusion attached?")
    by_layer = {layer: w[0] for layer, w in recorded}  # (T, k) each
    if flow.config.granularity == "step":
        by_layer = {i: by_layer[0] for i in range(flow.config.num_layers)}
    weights = torch.stack([by_layer[i] for i in sorted(by_layer)])  # (layers, T, k)
    tokens = tokenizer.convert_ids_to_tokens(full)
    answer = decode(tokenizer, [i for i in answer_ids if i != tokenizer.eos_token_id])
    return Explanation(tokens, len(prompt_ids), weights, lora_names, answer)


def heatmap_png(explanation: Explanation, path: Path) -> None:
    """One panel per LoRA: layers (rows) × tokens (columns), coloured by that LoRA's weight."""
    from lorafuse._extras import require

    matplotlib = require("matplotlib", "study", "lorafuse explain's heatmap")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, length, k = explanation.weights.shape
    fig, axes = plt.subplots(
        k, 1, figsize=(max(6, 0.28 * length + 2), 1.0 + 0.45 * layers * k), squeeze=False
    )
    for i, ax in enumerate(axes[:, 0]):
        image = ax.imshow(explanation.weights[:, :, i].numpy(), aspect="auto", cmap="viridis")
        ax.set_ylabel("layer")
        ax.set_title(f"weight of {explanation.lora_names[i]}", fontsize=9)
        ax.axvline(explanation.prompt_length - 0.5, color="white", linewidth=1)
        ax.set_xticks(range(length), explanation.tokens, rotation=90, fontsize=6)
        fig.colorbar(image, ax=ax, fraction=0.02)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


_SCRIPT = """
const data = JSON.parse(document.getElementById('weights').textContent);
function colour(v, lo, hi) {
  const t = hi > lo ? (v - lo) / (hi - lo) : 0.5;
  const r = Math.round(255 * t), b = Math.round(255 * (1 - t));
  return `rgba(${r}, 80, ${b}, 0.45)`;
}
function paint() {
  const layer = document.getElementById('layer').value;
  const lora = Number(document.getElementById('lora').value);
  const spans = document.querySelectorAll('span.tok');
  const values = [];
  spans.forEach((s, t) => {
    const perLayer = data.weights.map(l => l[t][lora]);
    const mean = perLayer.reduce((a, b) => a + b, 0) / perLayer.length;
    const v = layer === 'mean' ? mean : perLayer[Number(layer)];
    values.push(v);
  });
  const lo = Math.min(...values), hi = Math.max(...values);
  spans.forEach((s, t) => {
    s.style.background = colour(values[t], lo, hi);
    s.dataset.shown = values[t].toFixed(3);
  });
  document.getElementById('range').textContent =
    `${data.loras[lora]} weight, ${layer === 'mean' ? 'mean over layers' : 'layer ' + layer}: ` +
    `blue = ${lo.toFixed(3)}, red = ${hi.toFixed(3)}`;
}
document.getElementById('layer').addEventListener('change', paint);
document.getElementById('lora').addEventListener('change', paint);
paint();
document.body.dataset.painted = 'yes';
"""


def render_html(explanation: Explanation, heatmap_name: str | None = None) -> str:
    """A self-contained page: tokens coloured by fusion weight, layer and LoRA selectable."""
    layers, length, k = explanation.weights.shape
    payload = {
        "loras": explanation.lora_names,
        "tokens": explanation.tokens,
        "weights": [
            [[round(float(v), 4) for v in explanation.weights[l_, t]] for t in range(length)]
            for l_ in range(layers)
        ],
    }
    spans = []
    for t, token in enumerate(explanation.tokens):
        title = "; ".join(
            f"layer {l_}: "
            + ", ".join(
                f"{n} {float(explanation.weights[l_, t, i]):.3f}"
                for i, n in enumerate(explanation.lora_names)
            )
            for l_ in range(layers)
        )
        part = "prompt" if t < explanation.prompt_length else "answer"
        spans.append(
            f'<span class="tok {part}" data-t="{t}" title="{html.escape(title)}">{html.escape(token)}</span>'
        )
    layer_options = '<option value="mean">mean over layers</option>' + "".join(
        f'<option value="{i}">layer {i}</option>' for i in range(layers)
    )
    default_lora = k - 1
    lora_options = "".join(
        f'<option value="{i}"{" selected" if i == default_lora else ""}>{html.escape(n)}</option>'
        for i, n in enumerate(explanation.lora_names)
    )
    image = (
        f'<p><img src="{html.escape(heatmap_name)}" alt="heatmap" style="max-width:100%"></p>'
        if heatmap_name
        else ""
    )
    data = json.dumps(payload).replace("</", "<\\/")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>lorafuse explain</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 70em; }}
.tokens {{ line-height: 2.2; font-family: monospace; font-size: 15px; }}
span.tok {{ padding: 2px 3px; margin: 1px; border-radius: 3px; }}
span.answer {{ border-bottom: 2px solid #333; }}
</style></head>
<body>
<h1>LoRA-Flow weights per token</h1>
<p>LoRAs: {html.escape(", ".join(explanation.lora_names))}. Underlined: the generated answer.
Hover a token for its weights at every layer.</p>
<p>Answer: <code id="answer">{html.escape(explanation.answer)}</code></p>
<label>layer <select id="layer">{layer_options}</select></label>
<label>colour by <select id="lora">{lora_options}</select></label>
<p id="range"></p>
<div class="tokens">{" ".join(spans)}</div>
{image}
<script type="application/json" id="weights">{data}</script>
<script>{_SCRIPT}</script>
</body></html>
"""


def write_explanation(explanation: Explanation, out: Path, *, inputs: OutputInputs = ()) -> tuple[Path, Path]:
    """Write ``out`` (HTML) and ``out`` with ``_heatmap.png`` beside it; returns both paths.

    Neither file may be, contain or lie inside any of ``inputs`` (the fusion, its LoRAs, the
    base); that is checked before anything is written.
    """
    out = Path(out)
    png = out.with_name(out.stem + "_heatmap.png")
    check_output_path(out, inputs, what="--out")
    check_output_path(png, inputs, what="the heatmap")
    out.parent.mkdir(parents=True, exist_ok=True)
    heatmap_png(explanation, png)
    write_text_atomic(out, render_html(explanation, png.name), inputs=inputs, what="--out")
    return out, png
