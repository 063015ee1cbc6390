"""Writing files and directories so that a kill mid-write never leaves a truncated one behind."""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def write_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a sibling temporary file and a rename: readers see the old file or
    the whole new one, never a part (a cut config.yaml or summary.json would still parse, wrongly)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def strict_json(obj: Any, **kw: Any) -> str:
    """``json.dumps`` with NaN and infinities as null: standard JSON, which other tools (jq, JavaScript, pandas
    with a strict parser) read; Python's own ``NaN`` token is not JSON."""
    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(obj), allow_nan=False, **kw)


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (where the platform allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def staging_dir(final: Path) -> Path:
    """A new empty directory beside ``final`` to write its contents into before ``install_dir``."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))


def occupied(path: Path) -> bool:
    """Whether ``path`` holds something: a file, or a directory with anything in it (a new name or an empty
    directory is free to write)."""
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def install_dir(tmp: Path, final: Path, replace: bool = True) -> bool:
    """Rename the finished directory ``tmp`` to ``final``, atomically: a reader sees the old ``final`` or the
    whole new one, never a part. An existing ``final`` is moved aside first and removed only after the
    rename (``replace``), or kept, and ``tmp`` deleted (not ``replace``: a concurrent writer finished first).
    Returns whether ``tmp`` was installed."""
    old = None
    if final.exists():
        if not replace:
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError:
        if old is not None:
            os.rename(old, final)  # put the old one back: never leave nothing where something was
        raise
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return True
