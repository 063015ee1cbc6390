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
import traceback
from pathlib import Path
from typing import Any


class UserFileError(ValueError):
    """A user's Python file (reward, environment, tools) that raised while it was imported: the message names
    the file, the line in it and the exception, not dapo's frames."""


def import_failure(what: str, e: BaseException, path: Path | None = None) -> str:
    """``what`` failed on import: the exception, where in the user's file (``path``: its last frame there; else the
    innermost frame) it was raised, and that line's text."""
    if isinstance(e, SyntaxError):  # the file never ran: the parser says where
        where = f"{e.filename}, line {e.lineno}" if e.filename else "its source"
        text = (e.text or "").strip()
        return f"{what}: SyntaxError at {where}: {e.msg}" + (f": {text}" if text else "")
    frames = traceback.extract_tb(e.__traceback__)
    mine = [f for f in frames if path is not None and Path(f.filename) == path] or frames[-1:]
    at = f" at {mine[-1].filename}, line {mine[-1].lineno}: {(mine[-1].line or '').strip()}" if mine else ""
    return f"{what}: {type(e).__name__}: {e}{at}"


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


def import_file(path: Path, prefix: str, key: str = "the file"):
    """Import a Python file once (by its absolute path) as its own module, named ``prefix`` + a hash of the path:
    a user's reward, environment or tools file. Code in it that raises (a syntax error, a missing import) is a
    ``UserFileError`` that names ``key`` (the config key the file came from), the file and its line."""
    module_name = f"{prefix}_{abs(hash(str(path)))}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # before exec, so pickling and dataclasses in the file work
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[module_name]
        raise UserFileError(import_failure(f"{key}: importing {str(path)!r} failed", e, path)) from e
    except BaseException:  # Ctrl-C, SystemExit: as they are
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
        try:
            module = import_file(path, prefix, key)
        except UserFileError as e:
            raise error(str(e)) from e.__cause__
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            if e.name != where and not where.startswith(f"{e.name}."):
                raise error(import_failure(f"{key}: importing module {where!r} ({spec!r}) failed", e)) from e
            local = Path(*where.split(".")).with_suffix(".py")
            hint = (f"; {local} is in the working directory, which the dapo command does not import from: name the "
                    f"file instead: {local}:{name}" if local.is_file() else
                    "; a module must be importable (installed, or on PYTHONPATH); a file is named as path/to/file.py:name")
            raise error(f"{key}: cannot import module {where!r} ({spec!r}): {e}{hint}") from e
        except Exception as e:  # the module's own code raised
            raise error(import_failure(f"{key}: importing module {where!r} ({spec!r}) failed", e)) from e
    obj = getattr(module, name, None)
    if obj is None:
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise error(f"{key}: {where!r} has no {kind} {name!r}; it defines: {', '.join(found) or 'nothing public'}")
    return obj


__all__ = ["UserFileError", "absolute_spec", "import_file", "import_failure", "is_file_ref", "load_named"]
