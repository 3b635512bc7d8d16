"""Measured tables go into ``docs/benchmarks.md`` by script, never by hand.

Each benchmark script builds its Markdown tables as one string and, given ``--docs PAGE``, splices it between the
page's markers ``<!-- table: NAME -->`` and ``<!-- end table: NAME -->``, replacing what was there. The prose
around the markers is written by people and quotes the tables; rerun the script, then reread that prose.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

__all__ = ["splice", "splice_file"]

_NAME = re.compile(r"[a-z0-9_]+")


def splice(page: str, name: str, table: str) -> str:
    """``page`` with the text between the markers of ``name`` replaced by ``table``."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"name must be lower-case letters, digits and underscores, got {name!r}")
    if not table.strip():
        raise ValueError(f"table for {name!r} is empty")
    begin, end = f"<!-- table: {name} -->\n", f"<!-- end table: {name} -->"
    if page.count(begin) != 1 or page.count(end) != 1:
        raise ValueError(f"the page must hold each marker of {name!r} exactly once: found {page.count(begin)} "
                         f"'{begin.strip()}' and {page.count(end)} '{end}'")
    if page.index(end) < page.index(begin):
        raise ValueError(f"'{end}' comes before '{begin.strip()}' for {name!r}")
    head, rest = page.split(begin)
    _, tail = rest.split(end)
    return head + begin + table.strip("\n") + "\n" + end + tail


def splice_file(path: Path, name: str, table: str) -> None:
    """Splice ``table`` into the page at ``path`` (written to a temporary file, then renamed)."""
    path = Path(path)
    text = splice(path.read_text(), name, table)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    print(f"wrote table {name!r} into {path}")
