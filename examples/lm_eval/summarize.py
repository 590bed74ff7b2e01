"""Collect run.sh's lm-eval results into OUT/summary.json and a Markdown table OUT/summary.md.

    python examples/lm_eval/summarize.py OUT [--command "how it was run"]

Reads the newest ``results_*.json`` under each ``OUT/<variant>/results/<model>/``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MC, GEN = "lorafuse_world_mc", "lorafuse_world_gen"
PROMPTS = {"plain": "as lm-eval sends them (no `<s>`)", "bos": "`<s>` first (the world's format)"}


def newest_results(folder: Path) -> dict:
    files = sorted(folder.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise SystemExit(f"no results_*.json under {folder}")
    return json.loads(files[-1].read_text())


def row(variant: str, model: str, data: dict) -> dict:
    results, samples = data["results"], data.get("n-samples", {})
    mc, gen = results[MC], results[GEN]
    return {
        "variant": variant,
        "model": model,
        "mc_acc": mc["acc,none"],
        "mc_acc_stderr": mc.get("acc_stderr,none"),
        "mc_acc_norm": mc["acc_norm,none"],
        "mc_n": samples.get(MC, {}).get("effective"),
        "gen_exact_match": gen["exact_match,after-marker"],
        "gen_exact_match_stderr": gen.get("exact_match_stderr,after-marker"),
        "gen_n": samples.get(GEN, {}).get("effective"),
        "lm_eval_version": data.get("lm_eval_version"),
        "model_args": data.get("config", {}).get("model_args"),
    }


def pct(value: float | None, err: float | None = None) -> str:
    if value is None:
        return "—"
    return f"{100 * value:.1f}" + (f" ± {100 * err:.1f}" if isinstance(err, float) else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--command", default=None, help="recorded in the summary as given")
    args = parser.parse_args()
    folders = sorted(p for p in args.out.glob("*/results/*") if p.is_dir())
    rows = [row(p.parent.parent.name, p.name, newest_results(p)) for p in folders]
    order = {"plain": 0, "bos": 1}
    rows.sort(key=lambda r: (order.get(r["variant"], 2), r["variant"], r["model"] != "base", r["model"]))
    (args.out / "summary.json").write_text(
        json.dumps({"command": args.command, "rows": rows}, indent=2) + "\n"
    )
    lines = [
        f"`{args.command}`" if args.command else "",
        "",
        f"| prompts | model | {MC} acc (%) | acc_norm (%) | {GEN} exact match (%) | questions |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {PROMPTS.get(r['variant'], r['variant'])} | {r['model']} | "
            f"{pct(r['mc_acc'], r['mc_acc_stderr'])} | {pct(r['mc_acc_norm'])} | "
            f"{pct(r['gen_exact_match'], r['gen_exact_match_stderr'])} | {r['mc_n']} |"
        )
    text = "\n".join(lines).lstrip("\n") + "\n"
    (args.out / "summary.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
