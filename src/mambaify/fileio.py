"""Writing results so that an interruption never leaves a half-written checkpoint behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path


class OutputExistsError(FileExistsError):
    pass


def mambaify_cache_dir() -> Path:
    """Root of mambaify's user cache: ``$MAMBAIFY_CACHE``, else ``~/.cache/mambaify``."""
    root = os.environ.get("MAMBAIFY_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "mambaify"


def check_output_dir(path: str | os.PathLike) -> Path:
    """Refuse to write into a directory that already holds something."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise OutputExistsError(
            f"output {path} already exists and is not empty; choose a new directory or remove it first"
        )
    return path


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike):
    """Yield a temporary sibling directory that becomes ``path`` only if the block succeeds.

    The rename is atomic on one filesystem, so ``path`` is either absent/empty or complete.
    """
    path = check_output_dir(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            path.rmdir()  # empty, checked above
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_directory(tmp: Path, path: Path) -> None:
    """Swap a finished directory into place, keeping the old one until the new one is there."""
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json_atomic(path: str | os.PathLike, data) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
