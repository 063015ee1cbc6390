"""A user's Python, named in the config: ``path/to/file.py:name`` or ``module:name``.

One way to read that spec for the reward function (``reward.fn``) and the environment (``env.path``), so the two
agree on what counts as a file and say the same things when it is wrong. The tools file (``env.tools``) is a
plain path, not such a spec; it shares only :func:`import_file`.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any


def is_file_ref(where: str) -> bool:
    """Whether the part before ``:`` names a file (ends in .py or has a path separator) rather than a module."""
    return where.endswith(".py") or os.sep in where or "/" in where


def absolute_spec(spec: Any) -> Any:
    """``file.py:name`` with the file made absolute (for a worker process that may start in another directory);
    anything else unchanged."""
    if isinstance(spec, str) and ":" in spec:
        where, _, name = spec.rpartition(":")
        if is_file_ref(where):
            return f"{Path(where).expanduser().resolve()}:{name}"
    return spec


def import_file(path: Path, prefix: str):
    """Import a Python file once (by its absolute path) as its own module, named ``prefix`` + a hash of the path:
    a user's reward, environment or tools file."""
    module_name = f"{prefix}_{abs(hash(str(path)))}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # before exec, so pickling and dataclasses in the file work
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def load_named(spec: str, *, key: str, kind: str, error: type[Exception], prefix: str, form_hint: str = "") -> Any:
    """The object ``spec`` names (``path/to/file.py:name``, relative to the working directory, or ``module:name``).

    ``key`` says where the spec came from (``env.path``), ``kind`` what it should be (``function``, ``class or
    function``); every failure raises ``error`` naming the spec and the file, module or attribute at fault.
    ``form_hint`` is put before the expected form in the malformed-spec message (the reward's built-in names).
    Whether the object is of the right type is the caller's check.
    """
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise error(f"{key} {spec!r} is not {form_hint}of the form 'path/to/file.py:name' or 'module:name'")
    if is_file_ref(where):
        path = Path(where).expanduser().resolve()
        if not path.is_file():
            raise error(f"{key}: file {str(path)!r} not found (from {spec!r})")
        module = import_file(path, prefix)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise error(f"{key}: cannot import module {where!r} ({spec!r}): {e}") from e
    obj = getattr(module, name, None)
    if obj is None:
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise error(f"{key}: {where!r} has no {kind} {name!r}; it defines: {', '.join(found) or 'nothing public'}")
    return obj


__all__ = ["absolute_spec", "import_file", "is_file_ref", "load_named"]
