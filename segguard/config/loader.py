"""YAML loading that remembers where every value came from.

pydantic and the semantic checks report a path such as ("egress", 0, "ports", 1);
`SourceMap.line(path)` turns it into the line of the file it was written on, so every
error can be printed as `file:line: field: message`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import re

import yaml

from segguard.errors import ConfigError, ConfigProblem

Path_ = tuple[str | int, ...]


@dataclass(slots=True)  # a loaded config keeps one per profile
class SourceMap:
    file: str
    lines: dict[Path_, int] = field(default_factory=dict)

    def line(self, path: Path_) -> int | None:
        """Line of `path`, or of its nearest ancestor that has one (a missing key is
        reported on the line of the mapping that should have held it)."""
        path = tuple(path)
        while True:
            if path in self.lines:
                return self.lines[path]
            if not path:
                return None
            path = path[:-1]

    def problem(self, path: Path_, message: str) -> ConfigProblem:
        return ConfigProblem(self.file, self.line(path), format_path(path), message)


def format_path(path: Path_) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


@dataclass
class Document:
    data: Any
    source: SourceMap


def _to_python(node: yaml.Node, path: Path_, smap: SourceMap, constructor: yaml.SafeLoader) -> Any:
    smap.lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = constructor.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int)):
                raise ConfigError([ConfigProblem(smap.file, key_node.start_mark.line + 1, format_path(path), "mapping keys must be strings")])
            if key in out:
                raise ConfigError([ConfigProblem(smap.file, key_node.start_mark.line + 1, format_path(path + (key,)), "duplicate key")])
            smap.lines[path + (key,)] = key_node.start_mark.line + 1
            out[key] = _to_python(value_node, path + (key,), smap, constructor)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_python(item, path + (i,), smap, constructor) for i, item in enumerate(node.value)]
    return constructor.construct_object(node, deep=True)


def _mac_safe(cls):
    """Implicit resolvers that keep "52:54:00:aa:00:01"-like scalars strings.

    YAML 1.1 reads unquoted 1:30 as a sexagesimal integer; a MAC written without quotes
    must never silently become a number, so the int/float resolvers lose that form.
    """
    # own copy first: the inherited dict is SafeLoader's, and editing it in place would
    # change yaml.safe_load for the whole process (plain ints would load as strings)
    cls.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    for first, resolvers in list(cls.yaml_implicit_resolvers.items()):
        cls.yaml_implicit_resolvers[first] = [
            (tag, regexp) for tag, regexp in resolvers
            if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float") or not regexp.match("1:30")
        ]
    cls.add_implicit_resolver(
        "tag:yaml.org,2002:int",
        re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
        list("-+0123456789"),
    )
    return cls


@_mac_safe
class _PyLoader(yaml.SafeLoader):
    pass


# libyaml's parser is several times faster than PyYAML's pure-Python one (loading was
# most of a 1,000-guest compile); it keeps marks and uses the same Python resolver, so
# the tweak above and every error line are the same with either.
if getattr(yaml, "__with_libyaml__", False):
    @_mac_safe
    class _CLoader(yaml.CSafeLoader):
        pass

    _Loader: type = _CLoader
else:
    _Loader = _PyLoader


def load_yaml(path: Path, display_name: str | None = None, data: bytes | None = None) -> Document:
    """`data`: the file's bytes, when the caller has read them already."""
    name = display_name or str(path)
    smap = SourceMap(name)
    try:
        text = (path.read_bytes() if data is None else data).decode("utf-8")
    except OSError as exc:
        raise ConfigError([ConfigProblem(name, None, "", f"cannot read: {exc.strerror or exc}")]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([ConfigProblem(name, None, "", f"not UTF-8 text: {exc}")]) from exc
    try:
        return _compose(text, smap, _Loader)
    except yaml.YAMLError as exc:
        if _Loader is _PyLoader:
            raise _parse_error(name, exc) from exc
    # libyaml words its errors differently: the rare failing file is parsed again by
    # PyYAML so the message (and line) a user sees does not depend on libyaml
    try:
        return _compose(text, SourceMap(name), _PyLoader)
    except yaml.YAMLError as exc:
        raise _parse_error(name, exc) from exc


def _compose(text: str, smap: SourceMap, cls: type) -> Document:
    loader = cls(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return Document({}, smap)
        return Document(_to_python(node, (), smap, loader), smap)
    finally:
        loader.dispose()


def _parse_error(name: str, exc: yaml.YAMLError) -> ConfigError:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        msg = " ".join(str(x) for x in (exc.context, exc.problem) if x) or str(exc)
        return ConfigError([ConfigProblem(name, line, "", f"YAML parse error: {msg}")])
    return ConfigError([ConfigProblem(name, None, "", f"YAML parse error: {exc}")])
