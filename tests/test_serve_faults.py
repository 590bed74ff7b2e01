"""A bounded fault test of ``lorafuse serve`` on loopback, in a subprocess, with a tiny model.

What bad clients and a careless operator do to a running server: oversized chunked bodies,
clients that disconnect or stop reading, corrupt or linking folders hot-added to the adapters
folder, and SIGTERM under load. Each test checks the server's answer (a status and a JSON error
body) and its state afterwards: memory bounded, no row running for a client that left (every
such row finishes as ``cancelled``, none runs to its length), the process exits on SIGTERM.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import psutil
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorafuse.tiny import random_peft_adapter, save_model, word_tokenizer

KEY = "fault-key"
LONG = 3000  # tokens of a request that would run for seconds if nobody cancelled it
HEADERS = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama with a 4,096-token context (so rows can run long), its word tokenizer, and an
    adapters folder with two PEFT adapters."""
    root = tmp_path_factory.mktemp("faults")
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    base = save_model(model, root / "base")
    word_tokenizer().save_pretrained(str(base))
    adapters = root / "adapters"
    random_peft_adapter(model, adapters / "a", seed=1, r=4)
    random_peft_adapter(model, adapters / "b", seed=2, r=2)
    return {"root": root, "base": base, "adapters": adapters}


class Served:
    """A ``lorafuse serve`` subprocess on a free loopback port."""

    def __init__(self, folders: dict[str, Path], *flags: str) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable,
            "-m",
            "lorafuse",
            "serve",
            "--base",
            str(folders["base"]),
            "--adapters",
            str(folders["adapters"]),
            "--port",
            str(self.port),
            "--api-key",
            KEY,
            "--model-name",
            "base",
            "--max-tokens",
            str(LONG),
            "--threads",
            "1",
            "--log-level",
            "warning",
            *flags,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.output = ""
        if not poll_until(self._up, 120) or self.process.poll() is not None:
            self.stop()
            raise AssertionError(f"lorafuse serve did not come up:\n{self.output}")

    def _up(self) -> bool:
        if self.process.poll() is not None:
            return True
        try:
            return httpx.get(self.url + "/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def health(self) -> dict[str, Any]:
        return httpx.get(self.url + "/health", timeout=10).json()

    def metric(self, name: str) -> float:
        """A sample of ``/metrics`` (0 when absent), e.g. ``lorafuse_running_rows``."""
        text = httpx.get(self.url + "/metrics", headers=HEADERS, timeout=10).text
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return 0.0

    @property
    def rss(self) -> int:
        return psutil.Process(self.process.pid).memory_info().rss

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.kill()
        self.output += self.process.communicate(timeout=30)[0] or ""
        return self.process.returncode


def poll_until(condition: Callable[[], bool], seconds: float) -> bool:
    """Poll ``condition`` every 50 ms until it holds or ``seconds`` pass (a wait, not a timing
    assertion: the outcome is checked separately)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture(scope="module")
def servers(folders: dict[str, Path]) -> Iterator[list[Served]]:
    """The servers started for this module (one, unless a test stopped it)."""
    started: list[Served] = []
    try:
        yield started
    finally:
        for server in started:
            server.stop()


@pytest.fixture()
def served(servers: list[Served], folders: dict[str, Path]) -> Served:
    """A running server shared by the tests; a new one when a test has stopped it (SIGTERM)."""
    if not servers or servers[-1].process.poll() is not None:
        servers.append(Served(folders, "--max-batch", "16", "--shutdown-grace", "0.5"))
    return servers[-1]


def raw_request(port: int, body: dict[str, Any], *, path: str = "/v1/completions") -> socket.socket:
    """A connected socket that has sent one complete JSON POST (the caller reads or drops it)."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    sock.sendall(head.encode() + data)
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one HTTP/1.1 response read until the server closes."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def long_body(model: str = "a", **extra: Any) -> dict[str, Any]:
    return {"model": model, "prompt": "w5 w6 w7", "max_tokens": LONG, "min_tokens": LONG, **extra}


def test_oversized_chunked_body_is_refused_without_reading_it(served: Served) -> None:
    ok = httpx.post(
        served.url + "/v1/completions", json=long_body(max_tokens=2, min_tokens=2), headers=HEADERS
    )
    assert ok.status_code == 200  # warm: lazily allocated buffers exist before measuring
    before = served.rss
    total, sent, piece = 64 << 20, 0, b"w" * (256 << 10)
    sock = socket.create_connection(("127.0.0.1", served.port), timeout=30)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
        + KEY.encode()
        + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    try:
        opening = b'{"model": "a", "prompt": "'
        sock.sendall(b"%x\r\n%s\r\n" % (len(opening), opening))
        while sent < total:
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            sent += len(piece)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server stopped reading and closed the connection
    status, headers, body = read_response(sock)
    sock.close()
    assert status == 413 and headers.get("content-type") == "application/json"
    assert "larger than 1048576 bytes" in json.loads(body)["error"]["message"]
    assert sent < total // 2  # the server hung up long before the body ended
    assert served.rss - before < 16 << 20  # far less than the 64 MiB sent
    declared = socket.create_connection(("127.0.0.1", served.port), timeout=30)
    declared.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
        b"Content-Length: %d\r\n\r\n{" % (KEY.encode(), total)
    )
    status, _, body = read_response(declared)  # refused from the headers, before any body
    declared.close()
    assert status == 413 and json.loads(body)["error"]["type"] == "invalid_request_error"


def test_no_row_runs_for_a_client_that_left_or_stops_reading(served: Served) -> None:
    cancelled = served.metric('lorafuse_requests_finished_total{reason="cancelled"}')
    lengths = served.metric('lorafuse_requests_finished_total{reason="length"}')
    tokens = served.metric("lorafuse_generation_tokens_total")
    dropped = [raw_request(served.port, long_body(model=m)) for m in ("a", "b", "base", "a", "b", "base")]
    dropped.append(raw_request(served.port, long_body(stream=True)))
    chat = {"model": "b", "messages": [{"role": "user", "content": "w9"}], "max_tokens": LONG}
    dropped.append(raw_request(served.port, chat | {"min_tokens": LONG}, path="/v1/chat/completions"))
    slow = []  # streaming clients that never read a byte
    for _ in range(2):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", served.port))
        data = json.dumps(long_body(stream=True)).encode()
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (KEY.encode(), len(data), data)
        )
        slow.append(sock)
    n = len(dropped) + len(slow)
    assert poll_until(lambda: served.health()["running"] == n, 60), served.health()
    while_slow = httpx.post(
        served.url + "/v1/completions",
        json=long_body(max_tokens=3, min_tokens=3),
        headers=HEADERS,
        timeout=60,
    )
    assert while_slow.status_code == 200  # slow readers hold nothing up
    for sock in dropped + slow:
        sock.close()
    assert poll_until(lambda: served.health()["running"] == 0, 60), served.health()
    assert poll_until(lambda: served.metric("lorafuse_running_rows") == 0, 10)  # the gauge too
    assert served.metric('lorafuse_requests_finished_total{reason="cancelled"}') - cancelled == n
    assert served.metric('lorafuse_requests_finished_total{reason="length"}') - lengths == 1  # while_slow
    assert served.metric("lorafuse_generation_tokens_total") - tokens < n * LONG / 4


def _corrupt_weights(adapters: Path, outside: Path) -> str:
    shutil.copytree(adapters / "a", adapters / "bad_weights")
    (adapters / "bad_weights" / "adapter_model.safetensors").write_bytes(
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not"
    )
    return "bad_weights"


def _corrupt_config(adapters: Path, outside: Path) -> str:
    shutil.copytree(adapters / "a", adapters / "bad_config")
    (adapters / "bad_config" / "adapter_config.json").write_text('{"r": 4, "lora_alpha": ')
    return "bad_config"


def _empty_fusion(adapters: Path, outside: Path) -> str:
    (adapters / "bad_fusion").mkdir()
    (adapters / "bad_fusion" / "fusion.json").write_text("{}")
    return "bad_fusion"


def _list_fusion(adapters: Path, outside: Path) -> str:
    (adapters / "list_fusion").mkdir()
    (adapters / "list_fusion" / "fusion.json").write_text("[1, 2]")
    return "list_fusion"


def _fusion_of_missing_loras(adapters: Path, outside: Path) -> str:
    (adapters / "lost_fusion").mkdir()
    fusion = {"method": "static", "lora_names": ["gone"], "lora_paths": {"gone": str(outside / "gone")}}
    (adapters / "lost_fusion" / "fusion.json").write_text(json.dumps(fusion))
    return "lost_fusion"


def _linked_file(adapters: Path, outside: Path) -> str:
    shutil.copytree(adapters / "a", adapters / "linked")
    outside.mkdir(exist_ok=True)
    target = outside / "weights.safetensors"
    shutil.copy(adapters / "a" / "adapter_model.safetensors", target)
    (adapters / "linked" / "adapter_model.safetensors").unlink()
    (adapters / "linked" / "adapter_model.safetensors").symlink_to(target)
    return "linked"


@pytest.mark.parametrize(
    ("make", "status"),
    [
        (_corrupt_weights, 400),
        (_corrupt_config, 400),
        (_empty_fusion, 400),
        (_list_fusion, 400),
        (_fusion_of_missing_loras, 400),
        (_linked_file, 404),  # not served at all, like a linked folder
    ],
    ids=lambda v: getattr(v, "__name__", str(v)).strip("_"),
)
def test_hot_added_corrupt_folder_is_a_json_4xx_naming_it_without_paths(
    served: Served, folders: dict[str, Path], make: Callable[[Path, Path], str], status: int
) -> None:
    name = make(folders["adapters"], folders["root"] / "outside")
    response = httpx.post(
        served.url + "/v1/completions", json={"model": name, "prompt": "w5", "max_tokens": 2}, headers=HEADERS
    )
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    assert f"`{name}`" in message
    assert str(folders["root"]) not in message and "/tmp" not in message and "/" + name not in message
    listed = [m["id"] for m in httpx.get(served.url + "/v1/models", headers=HEADERS).json()["data"]]
    assert (name in listed) == (status != 404)
    good = httpx.post(served.url + "/v1/completions", json={"model": "a", "prompt": "w5"}, headers=HEADERS)
    assert good.status_code == 200  # the others go on


def test_sigterm_under_load_stops_admitting_and_exits(served: Served) -> None:
    """Last in the file: it stops the shared server (a later test would start another)."""
    server = served
    answers: list[tuple[int, str]] = []

    def client(i: int) -> None:
        try:
            r = httpx.post(
                server.url + "/v1/completions",
                json=long_body(model="ab"[i % 2]),
                headers=HEADERS,
                timeout=120,
            )
            answers.append((r.status_code, r.json()["error"]["message"] if r.status_code != 200 else ""))
        except httpx.TransportError as exc:
            answers.append((0, type(exc).__name__))

    clients = [threading.Thread(target=client, args=(i,)) for i in range(20)]  # 16 rows run, 4 wait
    try:
        for thread in clients:
            thread.start()
        assert poll_until(lambda: server.health()["waiting"] == 4, 60), server.health()
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=20)  # 2 x 3,000 decoding steps would still be ahead
        for thread in clients:
            thread.join(30)
    finally:
        code = server.stop()
    assert code == 0, server.output
    assert "shut down" in server.output
    assert answers == [(503, "the server is shutting down")] * 20  # every client got a JSON answer
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url + "/health", timeout=2)  # nothing listens any more
