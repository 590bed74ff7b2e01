"""``lorafuse explain``: a LoRA-Flow fusion's gate weights on every token of an answer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lorafuse.cli.fuse import attached, pairs
from lorafuse.cli.options import COUNT, FOLDER


def explain(
    fusion: Annotated[Path, typer.Option(help="A LoRA-Flow fusion folder.", callback=FOLDER)],
    prompt: Annotated[str, typer.Option(help="The prompt to answer.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The HTML page to write (+ OUT_heatmap.png).")],
    base: Annotated[
        Path | None,
        typer.Option(help="Base model folder [default: recorded in the fusion].", callback=FOLDER),
    ] = None,
    lora: Annotated[
        list[str] | None, typer.Option(help="NAME=DIR: where a LoRA of the fusion now lives.")
    ] = None,
    max_new_tokens: Annotated[
        int, typer.Option(help="Tokens to generate at most (capped at the model's context).", callback=COUNT)
    ] = 64,
    tokenizer: Annotated[
        Path | None, typer.Option(help="Tokenizer folder [default: recorded / the base's].", callback=FOLDER)
    ] = None,
) -> None:
    """Show the gate: the answer with every token coloured by its fusion weights (layer selectable),
    and a layers × tokens heatmap PNG."""
    from lorafuse._data import tokenize
    from lorafuse._io import check_output_path
    from lorafuse.eval.generate import cap_new_tokens
    from lorafuse.fusion import LoRAFlow
    from lorafuse.fusion.explain import explain as run_explain
    from lorafuse.fusion.explain import write_explanation

    sources: dict[str, str | Path | None] = {"--fusion": fusion, "--base": base, "--tokenizer": tokenizer}
    sources |= {f"--lora {name}": path for name, path in pairs(lora, "--lora").items()}
    check_output_path(out, sources, what="--out")
    loaded, model, tok, handle = attached(base, fusion, lora, tokenizer, "float32", "auto")
    sources |= {f"LoRA {name}": path for name, path in loaded.lora_paths.items()}
    sources |= {"the fusion's base": loaded.info.get("base_model")}
    flow = handle.fusion_source
    if not isinstance(flow, LoRAFlow):
        raise typer.BadParameter(f"{fusion} is a {loaded.method} fusion; explain needs a lora-flow fusion")
    prompt_tokens = 1 + len(tokenize(tok, prompt))  # <s> + the prompt, as explain feeds it
    max_new_tokens = cap_new_tokens(model, prompt_tokens, max_new_tokens)
    explanation = run_explain(model, tok, flow, loaded.lora_names, prompt, max_new_tokens=max_new_tokens)
    page, png = write_explanation(explanation, out, inputs=sources)
    typer.echo(f"answer: {explanation.answer}")
    typer.echo(f"wrote {page} and {png}")


def register(app: typer.Typer) -> None:
    app.command()(explain)
