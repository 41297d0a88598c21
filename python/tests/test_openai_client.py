"""The official `openai` Python client, unchanged, against `lowrank serve` (the real binary on a
loopback port): models list, chat plain and streaming with usage, completions, an API error."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from test_bindings import CLI, FIXTURES, MODEL, ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_official_openai_client_works_unchanged(tmp_path: Path) -> None:
    port = free_port()
    with open(tmp_path / "serve.log", "w") as log:
        server = subprocess.Popen(
            [str(CLI), "serve", "--model", str(MODEL), "--weights", "q8_0", "--port", str(port), "--served-model-name", "smollm2",
             "--adapter", f"fixture={FIXTURES / 'peft_adapter'}"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).status == 200:
                        break
                except OSError:
                    pass
                assert time.monotonic() < deadline and server.poll() is None, (tmp_path / "serve.log").read_text()
                time.sleep(0.2)
            check = subprocess.run(
                [sys.executable, str(ROOT / "tools" / "openai_client_check.py"), "--base-url", f"http://127.0.0.1:{port}/v1",
                 "--model", "smollm2", "--adapter", "fixture"],
                capture_output=True, text=True, timeout=300,
            )
            assert check.returncode == 0, check.stdout + check.stderr
            assert "stream [fixture]" in check.stdout and "completion:" in check.stdout, check.stdout
            # SIGTERM: the server stops and exits 0.
            server.send_signal(signal.SIGTERM)
            assert server.wait(timeout=60) == 0
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
