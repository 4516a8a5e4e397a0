"""Real English text for the benchmarks, from files that ship with the project or its dependencies.

- `evaluation_text()`: what the benchmarks measure on: Python's history and license text
  (`connectors/assets/demo/python-license.txt`, also the demo's document) followed by scikit-learn's
  dataset descriptions (`sklearn/datasets/descr/*.rst`); ~15K tokens of SmolLM2's tokenizer.
- `profiling_texts()`: what codebooks are profiled on and never measured on: the topics of the Python
  language reference (`pydoc_data.topics`, shipped with CPython), one text per topic.
- `tokens_of(tok, text, n)`: the first n token ids of the text, repeated to length where it is shorter.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import numpy as np

_DEMO_ASSETS = Path(__file__).resolve().parents[1] / "connectors" / "assets" / "demo"


def evaluation_text() -> str:
    parts = [(_DEMO_ASSETS / "python-license.txt").read_text()]
    descr = importlib.resources.files("sklearn.datasets.descr")
    parts += [f.read_text() for f in sorted(descr.iterdir(), key=lambda f: f.name) if f.name.endswith(".rst")]
    return "\n\n".join(parts)


def profiling_texts() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def tokens_of(tok, text: str, n: int) -> np.ndarray:
    """[n] uint32 token ids of `text` (without special tokens), tiled when the text is shorter."""
    ids = np.asarray(tok(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=np.uint32)
    return np.tile(ids, -(-n // len(ids)))[:n]
