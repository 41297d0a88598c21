"""Training progress for notebooks (one HTML line updated in place) and terminals (one line on
stderr rewritten with a carriage return)."""

from __future__ import annotations

import html
import sys
import time
from typing import Any, Optional


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython  # type: ignore

        shell = get_ipython()
        return shell is not None and "IPKernelApp" in getattr(shell, "config", {})
    except ImportError:
        return False


class ProgressDisplay:
    """Turns the trainer's events into a progress line."""

    def __init__(self) -> None:
        self.total: Optional[int] = None
        self.step = 0
        self.loss: Optional[float] = None
        self.eval_loss: Optional[float] = None
        self.tokens_per_s: Optional[float] = None
        self.started = time.monotonic()
        self.handle: Any = None
        self.notebook = _in_notebook()
        if self.notebook:
            from IPython.display import HTML, display  # type: ignore

            self._html = HTML
            self.handle = display(HTML("<code>lowrank: loading…</code>"), display_id=True)

    def line(self) -> str:
        total = self.total or 0
        parts = [f"step {self.step}/{total}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.eval_loss is not None:
            parts.append(f"eval loss {self.eval_loss:.4f}")
        if self.tokens_per_s:
            parts.append(f"{self.tokens_per_s:.0f} tokens/s")
        parts.append(f"{time.monotonic() - self.started:.0f} s")
        return "  ".join(parts)

    def show(self, text: Optional[str] = None) -> None:
        text = text or self.line()
        if self.notebook:
            done = self.step / self.total if self.total else 0.0
            bar = f'<progress value="{done:.3f}" max="1" style="width:12em"></progress>'
            self.handle.update(self._html(f"{bar} <code>{html.escape(text)}</code>"))
        else:
            sys.stderr.write("\r" + text + " " * 8)
            sys.stderr.flush()

    def event(self, kind: str, payload: Any) -> None:
        if kind == "start":
            self.total, self.step = payload["total"], payload["resumed_at"]
        elif kind == "step":
            self.step = payload["step"]
            self.loss = payload.get("loss", self.loss)
            self.tokens_per_s = payload.get("tokens_per_s", self.tokens_per_s)
        elif kind == "eval":
            self.eval_loss = payload.get("eval_loss", self.eval_loss)
        elif kind == "message":
            if not self.notebook:
                sys.stderr.write("\r" + str(payload) + "\n")
            return
        self.show()

    def close(self) -> None:
        if not self.notebook:
            sys.stderr.write("\n")
            sys.stderr.flush()
