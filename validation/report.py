"""Checks, the Markdown report and atomic file writes shared by the validation scripts."""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Z_TOLERANCE", "Check", "compare", "Report", "prepare_folder", "write_text_atomic", "save_figure_atomic"]

#: a Monte Carlo check fails beyond this many standard errors (about 7e-6 two-sided for a normal z-score)
Z_TOLERANCE = 4.5


@dataclass
class Check:
    """One comparison of a library value with an independent reference.

    ``kind`` is ``"relative"`` (``error`` = |got - ref| / |ref| against ``tolerance``), ``"absolute"``,
    ``"z-score"`` (``error`` = (got - ref) / standard error of the Monte Carlo reference) or ``"log ratio"``
    (``error`` = log(got / ref) / standard error of that logarithm: a spread against a stated error).
    """

    group: str
    name: str
    got: float
    reference: float
    kind: str
    error: float
    tolerance: float
    seconds: float = 0.0
    note: str = ""

    @property
    def passed(self) -> bool:
        return math.isfinite(self.error) and abs(self.error) <= self.tolerance


def compare(group, name, got, reference, kind, tolerance, *, standard_error=None, seconds=0.0, note="") -> Check:
    got, reference = float(got), float(reference)
    if kind == "relative":
        error = abs(got - reference) / max(abs(reference), 1e-300)
    elif kind == "absolute":
        error = abs(got - reference)
    elif kind == "z-score":
        error = (got - reference) / standard_error if standard_error > 0 else (0.0 if got == reference else math.inf)
    elif kind == "log ratio":
        error = math.log(got / reference) / standard_error if got > 0 and reference > 0 else math.inf
    else:
        raise ValueError(f"kind must be 'relative', 'absolute', 'z-score' or 'log ratio', got {kind!r}")
    return Check(group, name, got, reference, kind, error, tolerance, seconds, note)


@dataclass
class Report:
    title: str
    sections: list = field(default_factory=list)  # (heading, markdown text)
    checks: list = field(default_factory=list)

    def add(self, heading: str, text: str) -> None:
        self.sections.append((heading, text))

    @property
    def failed(self) -> list:
        return [c for c in self.checks if not c.passed]

    def markdown(self) -> str:
        lines = [f"# {self.title}", "",
                 f"{len(self.checks)} checks, {len(self.failed)} failed. Relative and absolute errors are against "
                 f"independent quadrature or exact sums; z-scores are (library - Monte Carlo) / standard error, "
                 f"failing beyond {Z_TOLERANCE}, and so are log ratios (the spread of repeated Monte Carlo "
                 f"estimates against their stated standard error, over the logarithm's own).", ""]
        for heading, text in self.sections:
            lines += [f"## {heading}", "", text, ""]
        lines += ["## Every check", "",
                  "| group | check | library (how) | library | reference | kind | error | tolerance | s | ok |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for c in self.checks:
            group, name, note = (text.replace("|", "\\|") for text in (c.group, c.name, c.note))  # "KL(p || q)"
            lines.append(f"| {group} | {name} | {note} | {c.got:.10g} | {c.reference:.10g} | {c.kind} | "
                         f"{c.error:.2e} | {c.tolerance:.1e} | {c.seconds:.2f} | {'yes' if c.passed else '**NO**'} |")
        return "\n".join(lines) + "\n"


def _atomic(path: Path, write) -> None:
    """``write(temporary_path)`` in the same folder, flushed to disk, then renamed: never a truncated file. The file
    gets the permissions a plain write would (``mkstemp``'s are owner-only: reports and figures nobody else could
    read)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):  # (gone where the rename happened: the original error, not FileNotFoundError)
            os.unlink(tmp)
        raise
    # the rename itself on disk: the folder's entry, not only the file's data
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def prepare_folder(folder: Path) -> None:
    """Create ``folder`` and write and remove a temporary file in it, as the atomic writes will: an ``OSError``
    before any work where the outputs could not be written (an existing read-only folder passed ``mkdir``, and
    the run failed after minutes of checks)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".write-test.")
    os.close(fd)
    os.unlink(tmp)


def write_text_atomic(path: Path, text: str) -> None:
    _atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_figure_atomic(figure, path: Path) -> None:
    _atomic(path, lambda tmp: figure.savefig(tmp, dpi=120, bbox_inches="tight"))
