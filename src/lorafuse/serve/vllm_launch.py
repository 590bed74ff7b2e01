"""Starting vLLM's OpenAI server for ``lorafuse serve --engine vllm --vllm-launch``."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def launch_command(
    python: str | Path,
    base: str | Path,
    tokenizer: str | Path,
    *,
    port: int,
    served_name: str,
    max_lora_rank: int,
    max_loras: int,
    extra: Sequence[str] = (),
) -> list[str]:
    """vLLM's OpenAI server on ``127.0.0.1:port`` serving ``base`` with LoRAs enabled."""
    return [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(base),
        "--tokenizer",
        str(tokenizer),
        "--served-model-name",
        served_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--enable-lora",
        "--max-lora-rank",
        str(max_lora_rank),
        "--max-loras",
        str(max_loras),
        *extra,
    ]


@contextlib.contextmanager
def launched(command: Sequence[str], url: str, log_file: str | Path, timeout: float = 900.0) -> Any:
    """Run vLLM's server (``command``, output to ``log_file``) with run-time LoRA loading on; wait
    until ``url/health`` answers; stop it on exit. A vLLM that exits or does not answer within
    ``timeout`` seconds is a ``RuntimeError`` naming the log."""
    import os
    import subprocess

    import httpx2

    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    env.pop("PYTHONPATH", None)  # vLLM's own environment, not lorafuse's
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    with Path(log_file).open("wb") as out:
        process = subprocess.Popen(list(command), stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"vLLM exited with status {process.returncode} while starting; see {log_file}"
                )
            try:
                if httpx2.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx2.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM did not answer {url}/health within {timeout:.0f} s; see {log_file}")
            time.sleep(1)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
