"""Writing files so that a kill mid-write never leaves a truncated one behind."""
from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a sibling temporary file and a rename: readers see the old file or
    the whole new one, never a part (a cut config.yaml or summary.json would still parse, wrongly)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
