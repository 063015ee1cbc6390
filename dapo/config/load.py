"""Building a config: defaults <- preset <- the task's keys <- YAML file <- ``key=value`` overrides, validated.

Keys are dotted (``algo.eps_high=0.28``); an unknown key is an error that names the closest valid one;
a key that moved (``RENAMED``) still works, with a message naming its new place.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import types
import typing
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Callable

import yaml

from dapo.config.errors import ConfigError
from dapo.config.sections import PRESETS, RENAMED, Config
from dapo.config.validate import validate
from dapo.fsutil import write_atomic


def valid_keys() -> list[str]:
    keys = []
    hints = typing.get_type_hints(Config)
    for f in fields(Config):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            keys += [f"{f.name}.{g.name}" for g in fields(t)]
        else:
            keys.append(f.name)
    return keys


PEER_NAMES = {
    "ratio_level": "algo.policy_loss=gspo (a sequence-level ratio) or ppo (per token)",
    "importance_sampling_level": "algo.policy_loss=gspo (a sequence-level ratio) or ppo (per token)",
    "clip_ratio_low": "algo.eps_low", "clip_ratio_high": "algo.eps_high",
    "epsilon": "algo.eps_low", "epsilon_high": "algo.eps_high",
    "loss_type": "algo.loss_agg (how token losses are averaged) and algo.policy_loss (ppo, gspo, cispo)",
    "loss_agg_mode": "algo.loss_agg",
    "adv_estimator": "algo.adv_estimator (grpo or rloo)",
}
"""Names verl and TRL use (by their last part), and what the same thing is called here."""


def _unknown_key(key: str, where: str = "") -> ConfigError:
    peer = PEER_NAMES.get(key.split(".")[-1])
    if peer and not peer.startswith(key + " "):
        return ConfigError(f"unknown config key {key!r}{where}; in dapo that is {peer}")
    close = difflib.get_close_matches(key, valid_keys(), n=1, cutoff=0.5)
    if not close:  # a bare field name without its section, e.g. eps_high -> algo.eps_high
        close = [k for k in valid_keys() if k.split(".")[-1] == key.split(".")[-1]][:1]
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{where}{hint}")


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Turn a YAML value or a command-line string into the field's type, or raise naming the key."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _coerce(key, value, args[0])
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(typ)
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]: any length
            return tuple(_coerce(key, v.strip() if isinstance(v, str) else v, args[0]) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(key, v, a) for v, a in zip(value, args))
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("true", "1", "yes", "on"):
                return True
            if s in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if typ is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value).lower() if isinstance(value, bool) else str(value)  # YAML's true -> "true"
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected {typ.__name__}, got {value!r}") from None
    raise ConfigError(f"{key}: unsupported type {typ}")


def _renamed(flat: dict[str, Any], where: str, notify: Callable[[str], None] | None) -> dict[str, Any]:
    """``flat`` with moved keys under their new names; ``notify`` is told once per moved key."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        new = RENAMED.get(key)
        if new is not None:
            if new in flat:
                raise ConfigError(f"{key}{where} moved to {new}, which is also given: keep only {new}")
            if notify is not None:
                notify(f"dapo: config key {key}{where} is now {new} (the old name works for one more release)")
            key = new
        out[key] = value
    return out


def _apply(cfg: Config, flat: dict[str, Any], where: str = "",
           notify: Callable[[str], None] | None = None) -> Config:
    hints = typing.get_type_hints(Config)
    sections: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, value in _renamed(flat, where, notify).items():
        head, _, tail = key.partition(".")
        if head not in hints:
            raise _unknown_key(key, where)
        sec_type = hints[head]
        if dataclasses.is_dataclass(sec_type):
            sub_hints = typing.get_type_hints(sec_type)
            if not tail:  # ``optim: 5`` in a YAML file, ``optim=5`` on the command line
                some = next(iter(sub_hints))
                raise ConfigError(f"{key!r}{where} is a section, not a key: give its keys as a mapping ({key}: "
                                  f"{{{some}: ...}}) or one at a time ({key}.{some}=...); got {value!r}")
            if tail not in sub_hints:
                raise _unknown_key(key, where)
            sections.setdefault(head, {})[tail] = _coerce(key, value, sub_hints[tail])
        else:
            if tail:
                raise _unknown_key(key, where)
            top[head] = _coerce(key, value, sec_type)
    for head, kv in sections.items():
        top[head] = replace(getattr(cfg, head), **kv)
    return replace(cfg, **top)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not key.count("."):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def parse_overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. algo.eps_high=0.28)")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _stderr(text: str) -> None:
    print(text, file=sys.stderr)


def load_config(
    preset: str | None = None,
    file: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    base: Config | None = None,
    notify: Callable[[str], None] | None = _stderr,
) -> Config:
    """defaults (or ``base``) <- preset <- the built-in task's keys (``Task.train_overrides``) <- YAML file <-
    overrides, validated. ``notify`` gets the messages about moved keys (stderr by default).

    A preset is applied to the defaults, or to ``base`` only when one is named (argument, ``preset=``
    override or file): a saved run's config already holds its preset's values and the user's changes to
    them, which re-applying the preset would undo."""
    named = bool(preset) or (isinstance(overrides, dict) and "preset" in overrides) or (
        isinstance(overrides, list) and any(o.split("=", 1)[0].strip() == "preset" for o in overrides))
    cfg = base or Config()
    file_flat: dict[str, Any] = {}
    if file is not None:
        path = Path(file)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read config: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a config file must be a mapping of sections to keys")
        file_flat = _flatten(data)
    over = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    named = named or "preset" in file_flat
    name = preset or over.pop("preset", None) or file_flat.pop("preset", None) or cfg.preset
    over.pop("preset", None)
    file_flat.pop("preset", None)
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown preset {name!r}{hint} (valid: {', '.join(PRESETS)})")
    if base is None or named:
        cfg = _apply(cfg, PRESETS[name], " in preset")
    cfg = replace(cfg, preset=name)
    if base is None:  # a saved run's config holds its task's keys already, and the user's changes to them
        task = str(over.get("data.task") or file_flat.get("data.task") or cfg.data.task)
        if not (over.get("data.path") or file_flat.get("data.path")):
            from dapo.data.tasks import TASKS  # the tasks' own module (it imports nothing heavy)

            if task in TASKS and TASKS[task].train_overrides:
                cfg = _apply(cfg, TASKS[task].train_overrides, f" in the defaults of task {task}")
    if file_flat:
        cfg = _apply(cfg, file_flat, f" in {file}", notify)
    if over:
        cfg = _apply(cfg, over, "", notify)
    return validate(_absolute_paths(cfg))


def _absolute_paths(cfg: Config) -> Config:
    """Local files and directories the config names, made absolute against the working directory: the run's
    config.yaml must name the same files when ``--resume`` or ``dapo eval`` reads it from elsewhere. Only a path
    that exists here changes: a hub id (``Qwen/Qwen2.5-0.5B``), a module (``my_pkg.rewards:score``), a built-in
    name and a missing file (which the loaders name as the user spelled it) stay as they are."""
    from dapo.envs.tools import BUILTIN_TOOLS
    from dapo.userfile import is_file_ref

    def here(path: str) -> str | None:
        try:
            p = Path(path).expanduser()
        except RuntimeError:  # ~nosuchuser/...: the loader names it
            return None
        return os.path.abspath(p) if path and p.exists() else None

    def value(key: str) -> str:
        head, _, tail = key.partition(".")
        return getattr(getattr(cfg, head), tail)

    new: dict[str, str] = {}
    for key in ("model.path", "model.tokenizer", "data.path", "eval.path", "env.tools"):
        if value(key) not in BUILTIN_TOOLS and (full := here(value(key))) is not None:
            new[key] = full
    for key in ("reward.fn", "env.path"):
        where, sep, name = value(key).rpartition(":")
        if sep and where and is_file_ref(where) and (full := here(where)) is not None:
            new[key] = f"{full}:{name}"
    new = {k: v for k, v in new.items() if v != value(k)}
    return _apply(cfg, new) if new else cfg


def run_config(run_dir: str | Path, overrides: list[str] | None = None, preset: str | None = None,
               file: str | Path | None = None) -> Config | None:
    """The config a run directory saved (``config.yaml``) with ``preset`` (its keys only), ``file`` and
    ``overrides`` on top, or None without one (a resume continues with it; ``dapo eval`` evaluates a checkpoint
    the way it was trained)."""
    saved = Path(run_dir) / "config.yaml"
    if not saved.is_file():
        return None
    try:
        base = config_from_dict(yaml.safe_load(saved.read_text(encoding="utf-8")))
    except (OSError, yaml.YAMLError, TypeError, AttributeError) as e:
        raise ConfigError(f"{saved}: cannot read the run's config: {e}") from None
    return load_config(preset, file, list(overrides or []), base=base)


def resume_named(file: str | Path | None, overrides: list[str]) -> str:
    """``ckpt.resume`` as the overrides (the last one wins) or else the YAML file name it, read before anything
    is validated: a resume's keys are judged on top of the run's saved config. "" when neither does (or the
    file cannot be read: load_config names that)."""
    for item in reversed(overrides):
        key, sep, value = item.partition("=")
        if sep and key.strip() == "ckpt.resume":
            return value.strip()
    if file is None:
        return ""
    try:
        data = yaml.safe_load(Path(file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return ""
    value = _flatten(data).get("ckpt.resume") if isinstance(data, dict) else None
    return str(value) if value else ""


def config_from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a Config from ``to_dict()`` output (e.g. a run's config.yaml; moved keys are read quietly)."""
    d = dict(d)
    preset = d.pop("preset", "dapo")
    cfg = _apply(Config(), _flatten(d), " in saved config")
    return validate(replace(cfg, preset=preset))


def _plain(x: Any) -> Any:
    """``Config.to_dict()`` as YAML holds it (tuples as lists)."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, tuple):
        return list(x)
    return x


def save_config(cfg: Config, path: str | Path) -> None:
    # write then rename: a kill mid-write must not leave a truncated config.yaml, which would still parse
    # (with fewer keys, silently defaulted) when the run is resumed
    write_atomic(path, yaml.safe_dump(_plain(cfg.to_dict()), sort_keys=False))


def _config_diff(saved: str | Path, cfg: Config, ignore: tuple[str, ...]) -> list[tuple[str, Any, Any]]:
    """(key, value in the config.yaml at ``saved``, value in ``cfg``) for every key (but ``ignore``) that
    differs; none when it cannot be read."""
    try:
        old = _flatten(yaml.safe_load(Path(saved).read_text(encoding="utf-8")) or {})
    except (OSError, yaml.YAMLError, AttributeError):
        return []
    new = _flatten(_plain(cfg.to_dict()))
    return [(k, old.get(k), v) for k, v in new.items() if k not in ignore and old.get(k) != v]


def config_changes(saved: str | Path, cfg: Config, ignore: tuple[str, ...] = ()) -> list[str]:
    """``key: old -> new`` for every key (but ``ignore``) whose value in ``cfg`` differs from the config.yaml at
    ``saved`` (as ``save_config`` wrote it); none when it cannot be read."""
    return [f"{k}: {old!r} -> {new!r}" for k, old, new in _config_diff(saved, cfg, ignore)]


def changed_overrides(saved: str | Path, cfg: Config, ignore: tuple[str, ...] = ()) -> list[str]:
    """``key=value`` overrides that turn the config.yaml at ``saved`` into ``cfg`` (as a command line would
    give them: what a resume must be told again when its run has not saved them yet)."""

    def text(v: Any) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, (list, tuple)):
            return ",".join(str(x) for x in v)
        return "null" if v is None else str(v)

    return [f"{k}={text(new)}" for k, _, new in _config_diff(saved, cfg, ignore)]


# --------------------------------------------------------------------------------------------------
# describing keys (for --help-config and for every command's flags)


def field_doc(key: str) -> str:
    """The docstring under a dotted key's field ("" when it has none); top-level keys (``seed``) too."""
    head, _, tail = key.partition(".")
    if not tail:
        return _field_docs(Config).get(head, "")
    return _field_docs(typing.get_type_hints(Config)[head]).get(tail, "")


def default(key: str) -> Any:
    head, _, tail = key.partition(".")
    return getattr(getattr(Config(), head), tail) if tail else getattr(Config(), head)


def describe() -> str:
    """Every key with its default and docstring, for ``dapo train --help-config``."""
    lines = []
    hints = typing.get_type_hints(Config)
    for f in fields(Config):
        t = hints[f.name]
        if not dataclasses.is_dataclass(t):
            continue
        docs = _field_docs(t)
        lines.append(f"[{f.name}]" + (f"  {t.__doc__.strip()}" if t.__doc__ and not t.__doc__.startswith(t.__name__) else ""))
        for g in fields(t):
            lines.append(f"  {f.name}.{g.name} = {getattr(t(), g.name)!r}")
            if g.name in docs:
                lines.append(f"      {docs[g.name]}")
    return "\n".join(lines)


def _field_docs(cls: type) -> dict[str, str]:
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for prev, node in zip(body, body[1:]):
        if isinstance(prev, ast.AnnAssign) and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            docs[prev.target.id] = " ".join(str(node.value.value).split())
    return docs
