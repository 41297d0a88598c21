"""Looking at training data as the trainer sees it."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any, List, Optional

from . import _lowrank

if TYPE_CHECKING:
    from . import Model, Records


class PreviewExample:
    """One example: its tokens' text and which of them train (`trained[i]`)."""

    def __init__(self, tokens: List[str], trained: List[bool], total_tokens: int) -> None:
        self.tokens, self.trained, self.total_tokens = tokens, trained, total_tokens

    @property
    def trained_tokens(self) -> int:
        return sum(self.trained)

    def __str__(self) -> str:
        # As `lowrank preview` prints it: masked tokens in [brackets], '|' between tokens.
        return "|".join(t.replace("\n", "\\n") if k else f"[{t}]".replace("\n", "\\n") for t, k in zip(self.tokens, self.trained)) + "|"

    def _repr_html_(self) -> str:
        spans = []
        for token, trained in zip(self.tokens, self.trained):
            style = "background:#c8f7c5;color:#000" if trained else "color:#999"
            text = html.escape(token).replace("\n", "↵<br>")
            spans.append(f'<span style="{style};border-right:1px solid #ddd;white-space:pre-wrap">{text}</span>')
        cut = f", truncated to {len(self.tokens)}" if self.total_tokens > len(self.tokens) else ""
        head = f"<div><small>{self.total_tokens} tokens, {self.trained_tokens} trained{cut}</small></div>"
        return head + '<div style="font-family:monospace;line-height:1.6">' + "".join(spans) + "</div>"


class Preview(list):
    """The first examples of a data file, tokenized and masked as training does. Shown in
    Jupyter with the trained tokens highlighted and the masked ones grey."""

    def __str__(self) -> str:
        return "\n\n".join(f"example {i + 1}: {e.total_tokens} tokens, {e.trained_tokens} trained\n{e}" for i, e in enumerate(self))

    def __repr__(self) -> str:
        return str(self)

    def _repr_html_(self) -> str:
        legend = (
            '<div><span style="background:#c8f7c5">trained tokens</span> · '
            '<span style="color:#999">masked (label −100)</span></div>'
        )
        return legend + "".join(f"<h4>example {i + 1}</h4>{e._repr_html_()}" for i, e in enumerate(self))


def preview(
    model: "Model",
    data: "Records",
    format: Optional[str] = None,
    train_on_inputs: bool = False,
    seq_len: int = 512,
    limit: int = 3,
) -> Preview:
    """The first `limit` examples of `data` (a JSONL path or a list of records) as training
    sees them: which tokens train and which are masked (prompts and user turns, unless
    `train_on_inputs`)."""
    from . import _jsonl

    with _jsonl(data, "data") as path:
        rows: Any = _lowrank.preview(model._inner, path, format, train_on_inputs, seq_len, limit)
    return Preview(PreviewExample(*row) for row in rows)
