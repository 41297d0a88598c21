"""Executes a notebook headlessly (nbclient) from the repository root and checks what it
printed: the quickstart must end with exact-match accuracy after training above before.

    python tools/run_notebook.py examples/lora_quickstart.ipynb --out runs/notebook/lora_quickstart.ipynb
"""

import argparse
import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append(out.get("text", ""))
            elif "data" in out and "text/plain" in out["data"]:
                parts.append(out["data"]["text/plain"])
    return "\n".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("notebook", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="where the executed notebook is written")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    a = ap.parse_args()
    nb = nbformat.read(a.notebook, as_version=4)
    t = time.monotonic()
    NotebookClient(nb, timeout=a.timeout, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_suffix(".ipynb.tmp")
    nbformat.write(nb, tmp)
    tmp.replace(a.out)
    text = outputs_text(nb)
    m = re.search(r"RESULT exact_match_before=([0-9.]+) exact_match_after=([0-9.]+)", text)
    if not m:
        print(f"{a.notebook}: no RESULT line in its outputs", file=sys.stderr)
        return 1
    before, after = float(m.group(1)), float(m.group(2))
    images = sum(1 for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {}))
    print(f"{a.notebook}: ran in {time.monotonic() - t:.0f} s; exact match {before:.3f} -> {after:.3f}; {images} plot(s); written to {a.out}")
    if not after > before:
        print("exact match did not improve", file=sys.stderr)
        return 1
    if images == 0:
        print("the notebook produced no plot", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
