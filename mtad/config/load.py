"""Load mtad.toml into a Config, reporting every problem by its dotted key.

msgspec stops at the first error, so the raw TOML is walked table by table and field by
field against the schema's types: unknown keys first, then each field converted on its own
(`msgspec.convert`, lists element by element, Duration and Size through `dec_hook`), then
the semantic checks of `mtad.config.checks`. Only a document with no problem at all is
decoded into the Config that is returned.

Problem lines read `<dotted key>: <what is wrong>`, e.g. `listener[1].address: expected
host:port, got "nonsense"` (list indexes count from 0); TOML syntax errors read
`<file>: line 3, column 7: <what>`.

Trust: the config file is the operator's. Nothing here opens a socket.
"""

from __future__ import annotations

import os
import re
import tomllib
import typing
from pathlib import Path
from typing import Any

import msgspec

from mtad.config.checks import check_ca_files, check_tls_files, review
from mtad.config.schema import Config, Duration, Size, Within, show

StrPath = str | os.PathLike[str]

_TOML_WHERE = re.compile(r"^(?P<what>.*?)\s*\((?:at line (?P<line>\d+), column (?P<col>\d+)|at (?P<end>end of document))\)$")
_MSGSPEC_WHERE = re.compile(r" - at `\$[^`]*`$")


class ConfigError(Exception):
    """The config cannot be used; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def load_config(path: StrPath) -> Config:
    """Read, validate and normalise the TOML file at path; ConfigError lists every problem."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError([f"{os.fspath(path)}: cannot read: {(exc.strerror or 'error').lower()}"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - data.rfind(b"\n", 0, exc.start)
        raise ConfigError([f"{os.fspath(path)}: line {line}, column {column}: not UTF-8 text"]) from None
    base_dir = Path(os.path.abspath(path)).parent
    cfg, problems = _decode(text, base_dir, os.fspath(path))
    problems += check_tls_files(cfg.tls.cert, cfg.tls.key)
    problems += check_ca_files(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def check_config(path: StrPath) -> list[str]:
    """Every problem of the config at path (empty: it is fine). Opens no socket."""
    try:
        load_config(path)
    except ConfigError as exc:
        return exc.problems
    return []


def loads_config(text: str, *, base_dir: StrPath, source: str = "<string>") -> Config:
    """Validate TOML text; relative paths are resolved against base_dir. Reads no file.

    Does not look at the TLS files (load_config does); use it for configs built in tests.
    """
    cfg, problems = _decode(text, Path(base_dir), source)
    if problems:
        raise ConfigError(problems)
    return cfg


def _decode(text: str, base_dir: Path, source: str) -> tuple[Config, list[str]]:
    """The Config (stand-ins where a field is broken) and every problem; ConfigError on bad TOML."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([_toml_problem(source, str(exc))]) from None
    problems: list[str] = []
    clean = walk(raw, Config, "", problems)
    try:
        cfg = msgspec.convert(clean, Config, dec_hook=dec_hook)
    except msgspec.ValidationError as exc:  # the walk should have caught it; never lose the key
        raise ConfigError([*problems, _msgspec_problem(exc)]) from None
    cfg, semantic = review(cfg, base_dir)
    # A broken field was replaced by a stand-in: what the semantic checks say about it is noise.
    broken = [p.split(": ", 1)[0] for p in problems]
    problems += [p for p in semantic if not _about(p, broken)]
    return cfg, problems


def _about(problem: str, broken: list[str]) -> bool:
    """Whether a semantic problem is about (or mentions) a field the walk already reported."""
    key, _, text = problem.partition(": ")
    return any(key == b or key.startswith((b + ".", b + "[")) or b in text for b in broken)


def dec_hook(type_: type, obj: Any) -> Any:
    """Decode the schema's custom types for msgspec; ValueError becomes a ValidationError."""
    if type_ is Duration:
        return Duration.parse(obj)
    if type_ is Size:
        return Size.parse(obj)
    raise NotImplementedError(f"no decoder for {type_!r}")


def walk(value: Any, hint: Any, key: str, problems: list[str]) -> Any:
    """Check value against a schema type, appending one line per problem to problems.

    Returns the value with every broken part replaced by a neutral stand-in of the right
    type, so the semantic checks can still run on the parts that are fine.
    """
    base, extras = _unwrap(hint)
    if isinstance(base, type) and issubclass(base, msgspec.Struct):
        return _walk_struct(value, base, key, problems)
    if typing.get_origin(base) is list:
        (item,) = typing.get_args(base)
        item_base, _ = _unwrap(item)
        if isinstance(value, list):
            return [walk(element, item, f"{key}[{i}]", problems) for i, element in enumerate(value)]
        if isinstance(value, dict) and isinstance(item_base, type) and issubclass(item_base, msgspec.Struct):
            problems.append(f"{key}: expected an array of tables ([[{key}]]), got a table")
        else:
            problems.append(f"{key}: expected an array, got {show(value)}")
        return []
    problem = _leaf_problem(value, base, extras)
    if problem is None:
        return value
    problems.append(f"{key}: {problem}")
    return _stand_in(base, extras)


def _walk_struct(value: Any, cls: type[msgspec.Struct], key: str, problems: list[str]) -> dict[str, Any]:
    prefix = f"{key}." if key else ""
    if not isinstance(value, dict):
        problems.append(f"{key}: expected a table, got {show(value)}")
        value = {}
    fields = {f.name: f for f in msgspec.structs.fields(cls)}
    for name in value:
        if name not in fields:
            problems.append(f"{prefix}{name}: unknown key")
    hints = typing.get_type_hints(cls, include_extras=True)
    clean: dict[str, Any] = {}
    for name, field in fields.items():
        if name in value:
            clean[name] = walk(value[name], hints[name], prefix + name, problems)
        elif field.required:
            problems.append(f"{prefix}{name}: required key missing")
            clean[name] = _stand_in(*_unwrap(hints[name]))
    return clean


def _stand_in(base: Any, extras: tuple[Any, ...]) -> Any:
    """A value of the right type for a broken field; its own checks are not reported."""
    if base is str:
        return ""
    if base is int:
        return next((meta.ge for meta in extras if isinstance(meta, msgspec.Meta) and meta.ge is not None), 0)
    if typing.get_origin(base) is typing.Literal:
        return typing.get_args(base)[0]
    if base in (Duration, Size):
        return next((w.ge for w in extras if isinstance(w, Within)), 0)
    return {}  # a table: its fields take their defaults


def _unwrap(hint: Any) -> tuple[Any, tuple[Any, ...]]:
    if typing.get_origin(hint) is typing.Annotated:
        base, *extras = typing.get_args(hint)
        return base, tuple(extras)
    return hint, ()


def _leaf_problem(value: Any, base: Any, extras: tuple[Any, ...]) -> str | None:
    hint = typing.Annotated[(base, *extras)] if extras else base
    try:
        converted = msgspec.convert(value, hint, dec_hook=dec_hook)
    except msgspec.ValidationError as exc:
        return _describe(value, base, extras, exc)
    for extra in extras:
        if isinstance(extra, Within):
            if converted < extra.ge:
                return f"must be >= {_fmt(base, extra.ge)}, got {show(value)}"
            if converted > extra.le:
                return f"must be <= {_fmt(base, extra.le)}, got {show(value)}"
    return None


def _describe(value: Any, base: Any, extras: tuple[Any, ...], exc: msgspec.ValidationError) -> str:
    """The operator's words for a field msgspec refused."""
    if base in (Duration, Size):
        try:
            base.parse(value)
        except ValueError as parse_error:
            return str(parse_error)
    if base is int:
        if not isinstance(value, int) or isinstance(value, bool):
            return f"expected an integer, got {show(value)}"
        for meta in extras:
            if isinstance(meta, msgspec.Meta):
                if meta.ge is not None and value < meta.ge:
                    return f"must be >= {meta.ge}, got {value}"
                if meta.le is not None and value > meta.le:
                    return f"must be <= {meta.le}, got {value}"
    if base is str:
        return f"expected a string, got {show(value)}"
    if typing.get_origin(base) is typing.Literal:
        choices = ", ".join(show(choice) for choice in typing.get_args(base))
        return f"must be one of {choices}, got {show(value)}"
    return _MSGSPEC_WHERE.sub("", str(exc))


def _fmt(base: Any, bound: float) -> str:
    """A bound in the unit an operator would write it."""
    if base is Duration:
        for unit, seconds in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
            if bound >= seconds and bound % seconds == 0:
                return f"{int(bound // seconds)}{unit}"
        return f"{round(bound * 1000, 3):g}ms"
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if bound >= size and bound % size == 0:
            return f"{int(bound // size)}{unit}"
    return f"{int(bound)}"


def _toml_problem(source: str, message: str) -> str:
    match = _TOML_WHERE.match(message)
    if not match:
        return f"{source}: {message}"
    what = match["what"][:1].lower() + match["what"][1:]
    where = "at end of document" if match["end"] else f"line {match['line']}, column {match['col']}"
    return f"{source}: {where}: {what}"


def _msgspec_problem(exc: msgspec.ValidationError) -> str:
    text = str(exc)
    where = re.search(r" - at `\$\.?([^`]*)`$", text)
    key = where[1] if where else ""
    return f"{key or 'config'}: {_MSGSPEC_WHERE.sub('', text)}"
