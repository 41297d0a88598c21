"""lowrank from Python: load a model, fine-tune a LoRA adapter, generate, switch and merge
adapters — on the CPU, without PyTorch.

    import lowrank
    model = lowrank.Model.load("SmolLM2-135M-Instruct.Q4_1.gguf", weights="bf16")
    print(model.generate("Convert this date to ISO format (YYYY-MM-DD): May 3, 2021"))
    metrics = lowrank.train(model=model, data="train.jsonl", output="runs/dates", max_steps=50)
    model.load_adapter("runs/dates/adapter", name="dates")
    print(model.generate("...", adapter="dates"))

The work runs in lowrank's Rust engine (the `_lowrank` extension); every call that computes
releases the GIL, and errors are Python exceptions carrying lowrank's messages.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import numpy as np

from . import _lowrank, data
from ._progress import ProgressDisplay

__all__ = ["Model", "TextStream", "TrainResult", "train", "data", "cpu_features"]

PathLike = Union[str, "os.PathLike[str]"]
Records = Union[PathLike, Sequence[Dict[str, Any]]]


def cpu_features() -> List[str]:
    """The CPU features lowrank's kernels use on this machine (chosen at run time)."""
    return list(_lowrank.cpu_features())


class TextStream:
    """Text pieces of one generation as they are produced. Iterate it; `close()` (or dropping
    it) stops the generation before its next step."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._inner)

    def close(self) -> None:
        self._inner.close()

    def __enter__(self) -> "TextStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Model:
    """A pre-trained decoder (Llama, SmolLM2, Qwen2, Mistral) with its LoRA adapters.

    Adapters are applied unmerged — switching between them costs nothing — or merged into the
    weights (`merge`), which removes their per-token cost until `unmerge`.
    """

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    @staticmethod
    def load(path: PathLike, weights: str = "bf16") -> "Model":
        """Loads a Hugging Face model directory or a GGUF file. `weights` is how the frozen
        weights are kept: "f32" (exact), "bf16" (half the memory; fast on CPUs with AMX),
        "q8_0" or "q4_1" (GGML's block formats)."""
        return Model(_lowrank.Model.load(os.fspath(path), weights))

    @property
    def path(self) -> str:
        """Where the model was loaded from."""
        return self._inner.path

    @property
    def weights(self) -> str:
        """The format the frozen weights are kept in."""
        return self._inner.weights

    def generate(
        self,
        prompt: str,
        adapter: Optional[str] = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        chat: bool = True,
        stop: Sequence[str] = (),
    ) -> str:
        """Generates a continuation of `prompt` and returns its text.

        `chat=True` wraps the prompt as one user message in the model's chat template.
        `adapter`: None uses the active adapter (see `set_adapter`), "none" the base model, a
        name that adapter for this call only. `temperature=0` is greedy; `stop` strings end the
        text (they are not included)."""
        return "".join(self.stream(prompt, adapter, max_new_tokens, temperature, top_p, top_k, seed, chat, stop))

    def stream(
        self,
        prompt: str,
        adapter: Optional[str] = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        chat: bool = True,
        stop: Sequence[str] = (),
    ) -> TextStream:
        """Like `generate`, as an iterator of text pieces: ``"".join(model.stream(p))`` equals
        ``model.generate(p)``."""
        return TextStream(self._inner.stream(prompt, adapter, max_new_tokens, temperature, top_p, top_k, seed, chat, list(stop)))

    def logits(self, texts: Union[str, Sequence[str]], adapter: Optional[str] = None) -> np.ndarray:
        """Next-token logits at every position: float32 `[tokens, vocab]` for one text, or
        `[texts, longest, vocab]` for a list (positions past a text's end are NaN). Texts are
        tokenized with the tokenizer's special tokens, as ``tokenizer(text)`` does. The array is
        read-only (it views the engine's buffer); ``.copy()`` it to edit it."""
        single = isinstance(texts, str)
        raw, shape = self._inner.logits([texts] if single else list(texts), adapter)
        out = np.frombuffer(raw, dtype="<f4").reshape(shape)
        return out[0] if single else out

    def loss(self, texts: Union[str, Sequence[str]], adapter: Optional[str] = None, seq_len: int = 2048) -> float:
        """Mean next-token cross-entropy over every token of the texts, each followed by EOS
        (what ``lowrank eval`` reports for a JSONL file of {"text": ...} lines)."""
        return self._inner.loss([texts] if isinstance(texts, str) else list(texts), adapter, seq_len)

    def exact_match(self, data: Records, adapter: Optional[str] = None, max_new_tokens: int = 16) -> "ExactMatch":
        """Greedy answers to chat or prompt/completion records compared with their expected
        answers, as ``lowrank eval --exact-match``."""
        with _jsonl(data, "data") as path:
            correct, total, answers = self._inner.exact_match(path, adapter, max_new_tokens)
        return ExactMatch(correct, total, answers)

    def load_adapter(self, path: PathLike, name: str, scale: float = 1.0) -> None:
        """Loads a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) or
        a GGUF LoRA file as `name`. The first adapter loaded becomes active."""
        self._inner.load_adapter(os.fspath(path), name, scale)

    def set_adapter(self, name: Optional[str]) -> None:
        """Makes adapter `name` active for calls that do not name one; None for the base model."""
        self._inner.set_adapter(name)

    def merge(self, name: str) -> None:
        """Activates adapter `name` and folds it into the weights: no per-token cost."""
        self._inner.merge(name)

    def unmerge(self) -> None:
        """Takes the merged adapter back out of the weights (it stays active, unmerged)."""
        self._inner.unmerge()

    @property
    def adapters(self) -> List[Dict[str, Any]]:
        """The loaded adapters: name, rank, alpha, scale, targets, active, merged."""
        return self._inner.adapters

    @property
    def active_adapter(self) -> Optional[str]:
        """The active adapter's name, or None."""
        return self._inner.active_adapter

    def chat_prompt(self, message: str) -> str:
        """The text `generate(message, chat=True)` continues: the chat template around it."""
        return self._inner.chat_prompt(message)

    def __repr__(self) -> str:
        names = ", ".join(a["name"] for a in self.adapters) or "none"
        return f"Model({self.path!r}, weights={self.weights!r}, adapters: {names})"


class ExactMatch:
    """Exact-match accuracy: `correct` of `total`, and every (prompt, expected, got)."""

    def __init__(self, correct: int, total: int, answers: List[tuple]) -> None:
        self.correct, self.total, self.answers = correct, total, answers

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def __repr__(self) -> str:
        return f"ExactMatch({self.correct}/{self.total} = {100 * self.accuracy:.1f}%)"


class TrainResult(list):
    """The metrics of a run, one dict per optimizer step and per evaluation (what
    metrics.jsonl holds), with the run's `summary` (steps, final_loss, adapter_dir, …)."""

    summary: Dict[str, Any]

    @property
    def adapter_dir(self) -> str:
        return self.summary["adapter_dir"]

    @property
    def losses(self) -> List[float]:
        return [m["loss"] for m in self if "loss" in m]


class _jsonl:
    """A path for records: the path itself, or a list of dicts written to a temporary JSONL
    file for the duration of the `with` block."""

    def __init__(self, records: Records, what: str) -> None:
        self.records, self.what, self.tmp = records, what, None

    def __enter__(self) -> str:
        if isinstance(self.records, (str, os.PathLike)):
            return os.fspath(self.records)
        if not isinstance(self.records, (list, tuple)) or not all(isinstance(r, dict) for r in self.records):
            raise TypeError(f"{self.what} must be a path or a list of dicts, not {type(self.records).__name__}")
        fd, self.tmp = tempfile.mkstemp(prefix="lowrank-", suffix=".jsonl")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                for r in self.records:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
        except BaseException:
            os.unlink(self.tmp)
            raise
        return self.tmp

    def __exit__(self, *exc: Any) -> None:
        if self.tmp:
            os.unlink(self.tmp)


def train(
    model: Union[Model, PathLike],
    data: Records,
    output: PathLike = "lowrank-out",
    *,
    eval_data: Optional[Records] = None,
    progress: bool = True,
    on_step: Optional[Callable[[Dict[str, Any]], None]] = None,
    **settings: Any,
) -> TrainResult:
    """Fine-tunes a LoRA adapter and writes it, in PEFT's format, to `output`/adapter.

    `model` is a `Model` (its path and weight format are used) or a path; `data` and
    `eval_data` are JSONL paths or lists of records ({"text"}, {"prompt", "completion"},
    alpaca or {"messages"}). Every other keyword is a setting of ``lowrank train`` under its
    snake_case name — rank, alpha, dropout, targets, batch_size, grad_accum, seq_len, lr,
    warmup_steps, schedule, epochs, max_steps, eval_every, save_every, seed, threads,
    gradient_checkpointing, weights, resume, overwrite, … — with the same defaults and checks.

    Shows progress (a live line in Jupyter, on stderr in a terminal) unless `progress=False`;
    `on_step(metric)` is called after every step and evaluation. Returns the metrics. Ctrl-C
    (KeyboardInterrupt) finishes the current step, writes a checkpoint and raises."""
    if isinstance(model, Model):
        settings.setdefault("weights", model.weights)
        model_path = model.path
    else:
        model_path = os.fspath(model)
    for key in ("output", "eval_data", "resume"):
        if isinstance(settings.get(key), os.PathLike):
            settings[key] = os.fspath(settings[key])
    if isinstance(settings.get("targets"), (list, tuple)):
        settings["targets"] = ",".join(settings["targets"])
    metrics = TrainResult()
    display = ProgressDisplay() if progress else None

    def on_event(kind: str, payload: Any) -> None:
        if kind in ("step", "eval"):
            metrics.append(payload)
            if on_step is not None:
                on_step(payload)
        if display is not None:
            display.event(kind, payload)

    with _jsonl(data, "data") as data_path, _jsonl(eval_data, "eval_data") if eval_data is not None else _nothing() as eval_path:
        settings.update(model=model_path, data=data_path, output=os.fspath(output))
        if eval_path is not None:
            settings["eval_data"] = eval_path
        try:
            metrics.summary = _lowrank.train(json.dumps(settings), on_event)
        finally:
            if display is not None:
                display.close()
    return metrics


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        pass
