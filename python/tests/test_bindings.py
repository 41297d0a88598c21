"""The Python bindings against the library, the CLI and PEFT's own numbers, on the real
SmolLM2-135M-Instruct: losses, greedy text, streaming, logits, adapters, merging, errors,
Ctrl-C during training and the GIL released while it runs.

Needs the model (./scripts/fetch_models.sh) and the CLI (cargo build --release); the README's
test command provides both."""

from __future__ import annotations

import _thread
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import lowrank

ROOT = Path(__file__).resolve().parents[2]
MODEL = Path(os.environ.get("LOWRANK_MODEL", ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
CLI = Path(os.environ.get("LOWRANK_BIN", ROOT / "target" / "release" / "lowrank"))
FIXTURES = ROOT / "tests" / "fixtures" / "smollm2"
DATES = ROOT / "data" / "dates"
PROMPT = "Convert this date to ISO format (YYYY-MM-DD): March 7, 2011"


def cli(*args: str) -> str:
    assert CLI.exists(), f"{CLI} is missing: build it with cargo build --release"
    done = subprocess.run([str(CLI), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def model() -> lowrank.Model:
    assert MODEL.exists(), f"{MODEL} is missing: run ./scripts/fetch_models.sh"
    return lowrank.Model.load(MODEL, weights="f32")


@pytest.fixture(scope="module")
def interop() -> dict:
    return json.loads((FIXTURES / "interop.json").read_text())


def test_loss_equals_peft_and_the_cli(model: lowrank.Model, interop: dict, tmp_path: Path) -> None:
    texts = interop["eval_texts"]
    # PEFT's own numbers (transformers + PEFT in fp32, tools/make_fixtures.py).
    assert model.loss(texts) == pytest.approx(interop["base_eval_loss"], rel=1e-4)
    model.load_adapter(FIXTURES / "peft_adapter", name="fixture")
    try:
        assert model.loss(texts, adapter="fixture") == pytest.approx(interop["peft_eval_loss"], rel=1e-4)
        assert model.loss(texts) == pytest.approx(interop["peft_eval_loss"], rel=1e-4)  # the first adapter is active
        assert model.loss(texts, adapter="none") == pytest.approx(interop["base_eval_loss"], rel=1e-4)
    finally:
        model.set_adapter(None)
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    report = json.loads(cli("eval", "--model", str(MODEL), "--data", str(data), "--json", "--seq-len", "2048"))
    assert model.loss(texts) == pytest.approx(report["loss"], rel=1e-6)


def test_greedy_text_equals_the_cli_and_the_stream(model: lowrank.Model) -> None:
    want = cli("generate", "--model", str(MODEL), "--prompt", PROMPT, "--chat", "--max-new-tokens", "12").rstrip("\n")
    got = model.generate(PROMPT, max_new_tokens=12)
    assert got == want
    pieces = list(model.stream(PROMPT, max_new_tokens=12))
    assert len(pieces) > 1 and "".join(pieces) == got
    plain = cli("generate", "--model", str(MODEL), "--prompt", "The capital of France is", "--max-new-tokens", "8").rstrip("\n")
    assert model.generate("The capital of France is", max_new_tokens=8, chat=False) == plain
    assert model.chat_prompt("hi").rstrip().endswith("assistant")


def test_a_closed_stream_frees_the_model(model: lowrank.Model) -> None:
    stream = model.stream(PROMPT, max_new_tokens=200)
    first = next(stream)
    assert first
    stream.close()
    assert list(stream) == []
    # The model can change again at once: nothing holds it.
    model.set_adapter(None)


def test_calls_from_two_threads_neither_deadlock_nor_mix(model: lowrank.Model) -> None:
    model.load_adapter(FIXTURES / "peft_adapter", name="t")
    errors = []

    def generate() -> None:
        try:
            for _ in range(3):
                model.generate(PROMPT, max_new_tokens=8)
                "".join(model.stream(PROMPT, max_new_tokens=4))
        except Exception as e:  # reported below
            errors.append(e)

    def switch() -> None:
        try:
            for i in range(20):
                model.set_adapter("t" if i % 2 else None)
                model.adapters
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=generate), threading.Thread(target=switch)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "deadlocked"
    # A change may be refused while the other thread's call holds the model; nothing else.
    assert all(isinstance(e, RuntimeError) and "in use" in str(e) for e in errors), errors
    model.set_adapter(None)


def test_logits_agree_across_batches_with_loss_and_pad_with_nan(model: lowrank.Model) -> None:
    tokens = json.loads((FIXTURES / "tokens.json").read_text())["strings"]
    short, long = tokens[0]["text"], tokens[1]["text"]
    one = model.logits(short)
    assert one.dtype == np.float32 and one.shape == (len(tokens[0]["ids"]), 49152)
    both = model.logits([short, long])
    n = len(tokens[0]["ids"])
    assert both.shape == (2, len(tokens[1]["ids"]), 49152)
    np.testing.assert_allclose(both[0, :n], one, atol=1e-3)  # f32 GEMMs block differently by row count
    assert np.isnan(both[0, n:]).all() and np.isfinite(both[1]).all()
    # Next-token cross-entropy from the logits equals loss() on the same text minus its EOS term.
    ids = tokens[1]["ids"]
    row = both[1].astype(np.float64)
    logz = np.log(np.exp(row - row.max(axis=1, keepdims=True)).sum(axis=1)) + row.max(axis=1)
    ce = logz[:-1] - row[np.arange(len(ids) - 1), ids[1:]]
    eos_term = logz[-1] - row[-1, 2]  # SmolLM2's EOS <|im_end|> has id 2
    assert (ce.sum() + eos_term) / len(ids) == pytest.approx(model.loss(long), rel=1e-4)


def test_adapters_switch_merge_and_unmerge(model: lowrank.Model) -> None:
    model.load_adapter(FIXTURES / "peft_adapter", name="a")
    model.load_adapter(FIXTURES / "peft_adapter", name="b", scale=0.5)
    try:
        info = {a["name"]: a for a in model.adapters}
        assert info["a"]["rank"] > 0 and info["b"]["scale"] == 0.5 and "q_proj" in info["a"]["targets"]
        text = "Low-rank adapters let one base model serve many tasks."
        base, la, lb = model.loss(text, adapter="none"), model.loss(text, adapter="a"), model.loss(text, adapter="b")
        assert len({round(base, 5), round(la, 5), round(lb, 5)}) == 3
        model.set_adapter("b")
        assert model.active_adapter == "b" and model.loss(text) == pytest.approx(lb, rel=1e-6)
        model.merge("a")
        assert [a["name"] for a in model.adapters if a["merged"]] == ["a"]
        assert model.loss(text) == pytest.approx(la, rel=1e-4)
        with pytest.raises(ValueError, match="merged"):
            model.loss(text, adapter="b")
        model.unmerge()
        assert model.loss(text, adapter="none") == pytest.approx(base, rel=1e-5)
    finally:
        model.unmerge()
        model.set_adapter(None)


def test_bad_input_raises_python_exceptions(model: lowrank.Model, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lowrank.Model.load(tmp_path / "nope.gguf")
    with pytest.raises(ValueError, match="q3"):
        lowrank.Model.load(MODEL, weights="q3")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00 truncated")
    with pytest.raises(ValueError):
        lowrank.Model.load(bad)
    with pytest.raises(ValueError, match="no adapter named"):
        model.set_adapter("missing")
    with pytest.raises(ValueError, match="no adapter named"):
        model.generate("hi", adapter="missing")
    with pytest.raises(FileNotFoundError):
        model.load_adapter(tmp_path / "no-adapter", name="x")
    with pytest.raises(ValueError, match="temperature"):
        model.generate("hi", temperature=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        model.stream("hi", temperature=-1.0)  # raised at once, not at the first piece
    before = model.adapters
    with pytest.raises(ValueError, match="no adapter named"):
        model.merge("missing")
    assert model.adapters == before
    with pytest.raises(ValueError, match="empty"):
        model.loss([])
    with pytest.raises(TypeError):
        model.generate(42)  # type: ignore[arg-type]
    with pytest.raises(OverflowError):
        model.generate("hi", max_new_tokens=-1)
    with pytest.raises(ValueError, match="unknown setting \"rnk\""):
        lowrank.train(model, DATES / "train.jsonl", tmp_path / "out", rnk=8, progress=False)
    with pytest.raises(ValueError, match="rank"):
        lowrank.train(model, DATES / "train.jsonl", tmp_path / "out", rank=0, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        lowrank.train(model, DATES / "train.jsonl", tmp_path / "out", batch_size="four", progress=False)
    with pytest.raises(TypeError):
        lowrank.train(model, 42, tmp_path / "out", progress=False)  # type: ignore[arg-type]


def small_run(**kw):
    return dict(rank=4, batch_size=2, seq_len=64, lr=1e-3, progress=False, **kw)


def test_train_from_records_returns_metrics_and_a_peft_adapter(model: lowrank.Model, tmp_path: Path) -> None:
    records = [json.loads(line) for line in (DATES / "train.jsonl").read_text().splitlines()[:16]]
    seen = []
    result = lowrank.train(model, records, tmp_path / "run", max_steps=3, on_step=seen.append, **small_run())
    assert [m["step"] for m in result] == [1, 2, 3] and seen == list(result)
    assert all(np.isfinite(m["loss"]) for m in result)
    adapter = Path(result.adapter_dir)
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    # The metrics file holds the same steps.
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in lines if "loss" in m] == result.losses


@pytest.fixture
def ctrl_c_raises():
    # A process started in the background by a non-interactive shell inherits SIGINT ignored,
    # and then `_thread.interrupt_main()` does nothing; give SIGINT Python's handler, as a
    # terminal's Ctrl-C has it.
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_ctrl_c_writes_a_checkpoint_and_raises(model: lowrank.Model, tmp_path: Path, ctrl_c_raises: None) -> None:
    out = tmp_path / "run"

    def interrupt(m: dict) -> None:
        _thread.interrupt_main()

    t = time.monotonic()
    with pytest.raises(KeyboardInterrupt, match="checkpoint"):
        lowrank.train(model, DATES / "train.jsonl", out, max_steps=200, on_step=interrupt, **small_run())
    assert time.monotonic() - t < 120
    checkpoints = list((out / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1, "no checkpoint was written"
    at = int(checkpoints[0].name.split("-")[1])
    # The run resumes from it (with the same settings) at the next step.
    seen = []

    def record_then_interrupt(m: dict) -> None:
        seen.append(m["step"])
        _thread.interrupt_main()

    with pytest.raises(KeyboardInterrupt):
        lowrank.train(model, DATES / "train.jsonl", out, max_steps=200, resume=str(checkpoints[0]), on_step=record_then_interrupt, **small_run())
    assert seen[0] == at + 1


def test_the_gil_is_released_while_training(model: lowrank.Model, tmp_path: Path) -> None:
    ticks = []
    stop = threading.Event()

    def count() -> None:
        while not stop.is_set():
            ticks.append(time.monotonic())
            time.sleep(0.01)

    counter = threading.Thread(target=count)
    counter.start()
    t0 = time.monotonic()
    try:
        lowrank.train(model, DATES / "train.jsonl", tmp_path / "run", max_steps=4, **small_run())
    finally:
        stop.set()
        counter.join()
    during = [t for t in ticks if t > t0 + 0.5]
    elapsed = time.monotonic() - t0 - 0.5
    # Ticking every 10 ms means ~100 per second when the thread can run; with the GIL held by
    # the training call it would get none.
    assert elapsed > 1 and len(during) > 20 * elapsed, (len(during), elapsed)


def test_preview_marks_the_trained_tokens(model: lowrank.Model) -> None:
    shown = lowrank.data.preview(model, DATES / "train.jsonl", limit=2)
    assert len(shown) == 2
    first = shown[0]
    assert len(first.tokens) == len(first.trained) == first.total_tokens
    # The user turn is masked; the assistant's answer (and its end token) train.
    answer = json.loads((DATES / "train.jsonl").read_text().splitlines()[0])["messages"][1]["content"]
    trained_text = "".join(t for t, k in zip(first.tokens, first.trained) if k)
    assert trained_text.startswith(answer) and not first.trained[0]
    html = shown._repr_html_()
    assert "#c8f7c5" in html and "color:#999" in html
    assert str(first) in cli("data", "preview", "--model", str(MODEL), "--data", str(DATES / "train.jsonl"), "--limit", "1")
