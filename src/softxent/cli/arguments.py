"""Argument types and checks the commands share: each bad value is refused up front with a
message naming the option (argparse's ``error: argument --x: …`` or ``softxent: --x …``), before
any work — never a traceback half way through."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

#: seeds NumPy's and scikit-learn's generators both take
SEED_LIMIT = 2**32


class UsageError(Exception):
    """A bad value or combination of options found after parsing (``--n`` without ``--v``, a
    ``--device`` that does not exist): ``softxent`` reports it as argparse reports its own —
    the command's usage, then ``softxent <command>: error: …`` — and exits with status 2."""


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """An int >= 1 (sizes, counts)."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def seed(text: str) -> int:
    """A seed in [0, 2**32)."""
    value = _integer(text)
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32), got {value}")
    return value


def output_dir(path: str, option: str = "--out") -> Path:
    """Create the output folder ``path`` (and its parents) now, or exit naming ``option``."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SystemExit(f"softxent: {option} {path!r}: cannot create the folder ({error.strerror or error})") from None
    if not os.access(out, os.W_OK):
        raise SystemExit(f"softxent: {option} {path!r}: the folder is not writable")
    return out


def output_file(path: Path, option: str) -> Path:
    """``path`` if a file can be written there (tried now, and left as it was), or exit naming ``option``."""
    existed = path.exists()
    try:
        with open(path, "a"):
            pass
    except OSError as error:
        why = error.strerror or error
        raise SystemExit(f"softxent: {option} {str(path)!r}: cannot write a file there ({why})") from None
    if not existed:
        path.unlink()
    return path
