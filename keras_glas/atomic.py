"""Atomic file writes: an interrupted or failed write leaves the previous file (or none), never
half a file.

Every writer of the project (configs, checkpoints, JSON results, PNG figures and predictions,
the leaderboard) goes through `atomic_path`: the data is written to a temporary file in the
destination's directory, so that the final `os.replace` is a rename within one file system.
TensorFlow-free, so the benchmarks can use it without importing TensorFlow.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yields a temporary path next to `path`; renames it onto `path` when the block succeeds.

    The temporary file is removed when the block raises, and the previous `path`, if any, is
    left as it was. Parent directories are created.

    Args:
        path: the file to write.
        suffix: the temporary name's ending, for writers that choose the format from it (Keras'
            `save_weights` wants `.weights.h5`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Process and thread ids keep concurrent writers of one path apart; the file is created by
    # the writer, so it gets the usual permissions (a mkstemp file would be private, 0600).
    temp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}{suffix}")
    try:
        yield temp
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` (UTF-8) at `path` atomically."""
    with atomic_path(path) as temp:
        temp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, data) -> None:
    """Writes `data` as indented JSON at `path` atomically (NaN and infinity as JSON5 literals,
    as `json` reads them back)."""
    write_text(path, json.dumps(data, indent=2) + "\n")
