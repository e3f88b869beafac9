"""Settings from flags, the environment and a TOML file (issue 13).

Every flag of every ``syncrep`` command can also be given

* in the environment, as ``SYNCREP_<NAME>``: the flag's destination in upper
  case (``--coordinator`` -> ``SYNCREP_COORDINATOR``, ``--ack-timeout-s`` ->
  ``SYNCREP_ACK_TIMEOUT_S``), or its long name when that differs
  (``--resync-max-rate`` -> ``SYNCREP_RESYNC_MAX_RATE``);
* in a TOML file: ``--config FILE``, else ``$SYNCREP_CONFIG``, else
  ``/etc/syncrep/syncrep.toml`` when it exists. Top-level keys apply to every
  command that has that flag; the tables ``[process.coordinator]``,
  ``[process.node]`` (both node roles), ``[process.primary]`` and
  ``[process.secondary]`` apply to that process only, the most specific one
  winning (``[process.*]`` rather than ``[coordinator]``: ``coordinator`` is
  already the key of ``--coordinator``)::

      coordinator = "hostC:7000"          # every command and node
      certs_dir = "/etc/syncrep/certs"

      [process.node]
      data_dir = "/var/lib/syncrep/node"
      ack_timeout_s = 2.0
      nbd_listen = "127.0.0.1:10809"

      [process.coordinator]
      listen = "0.0.0.0:7000"
      store = "etcds://10.0.0.1:2379,10.0.0.2:2379,10.0.0.3:2379"

Precedence: a flag on the command line over the environment over the file
over the built-in default. ``syncrep config show`` prints the effective
settings of a command and where each came from.

Why one generic layer over argparse rather than a second schema: the flag
table (``syncrep.cli.NODE_FLAGS`` and every ``add_argument``) stays the one
place a setting is declared, with its type, check and ``--help``; a value from
the environment or the file goes through the same ``type`` function as the
flag, so it is checked the same way, and a bad one is refused naming where it
came from (``SYNCREP_ACK_TIMEOUT_S='abc': ...``, ``FILE [process.node] ack_timeout_s``)
before the command does anything. An unknown key in the file is an error
(with the nearest known name): a typo must not be silently ignored. Unknown
``SYNCREP_*`` variables are ignored: the environment is shared with other
tools (``SYNCREP_TEST_SEED``, the systemd units' ``SYNCREP_NODE_ARGS``).
"""

from __future__ import annotations

import argparse
import difflib
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

CONFIG_ENV = "SYNCREP_CONFIG"
DEFAULT_CONFIG_PATH = Path("/etc/syncrep/syncrep.toml")
ENV_PREFIX = "SYNCREP_"
#: The file's ``[process.NAME]`` tables and the commands each applies to,
#: least specific first (a later table overrides an earlier one for a key).
SECTION_TABLE = "process"
SECTIONS: dict[str, tuple[str, ...]] = {
    "coordinator": ("coordinator",),
    "node": ("primary", "secondary"),
    "primary": ("primary",),
    "secondary": ("secondary",),
}
#: Destinations that are never settings (what the parser does, not how).
NOT_SETTINGS = frozenset({"help", "version", "config"})
#: A config file larger than this is refused (it is a handful of keys).
MAX_CONFIG_BYTES = 1024 * 1024

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


class ConfigError(Exception):
    """A setting from the environment or the file that cannot be used."""


@dataclass(frozen=True)
class Source:
    """Where an effective setting came from."""

    kind: Literal["flag", "env", "file", "default"]
    where: str = ""

    def __str__(self) -> str:
        return f"{self.kind} {self.where}" if self.where else self.kind


@dataclass
class Setting:
    dest: str
    flag: str
    value: Any
    source: Source


@dataclass
class Layered:
    """What :func:`apply` found: the config file used (or why none) and, per
    destination of the chosen command, the effective value's source."""

    config_path: Path | None
    config_origin: str
    command: tuple[str, ...]
    sources: dict[str, Source] = field(default_factory=dict)


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction[Any] | None:
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            return a
    return None


def _takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0 and not isinstance(action, argparse._SubParsersAction)


def command_chain(
    parser: argparse.ArgumentParser, argv: Sequence[str]
) -> tuple[list[argparse.ArgumentParser], tuple[str, ...]]:
    """The parsers ``argv`` goes through (top level first) and the command
    words (``("volume", "create")``): options are skipped with their values,
    the first positional word that names a subcommand descends."""
    chain, words = [parser], []
    current = parser
    i = 0
    while i < len(argv):
        sub = _subparsers(current)
        if sub is None:
            break
        token = argv[i]
        if token == "--":
            break
        if token.startswith("-"):
            opt = token.split("=", 1)[0]
            action = current._option_string_actions.get(opt)
            if action is not None and "=" not in token and _takes_value(action):
                i += 1
            i += 1
            continue
        nxt = sub.choices.get(token)
        if nxt is None:
            break
        chain.append(nxt)
        words.append(token)
        current = nxt
        i += 1
    return chain, tuple(words)


def _settable(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        a for a in parser._actions
        if a.option_strings and a.dest not in NOT_SETTINGS and a.dest != argparse.SUPPRESS
        and isinstance(a, (argparse._StoreAction, argparse._StoreTrueAction, argparse._StoreFalseAction))
    ]


def long_flag(action: argparse.Action) -> str:
    longs = [o for o in action.option_strings if o.startswith("--")]
    return longs[0] if longs else action.option_strings[0]


def _names(action: argparse.Action) -> dict[str, bool]:
    """The keys that name ``action`` in the file and the environment, each
    with whether it is the flag's name (True: a boolean means "flag given",
    which for ``--no-x`` is the opposite of the destination's value)."""
    names = {action.dest: False}
    for opt in action.option_strings:
        if opt.startswith("--"):
            names.setdefault(opt[2:].replace("-", "_"), True)
    return names


def _to_bool(text: str, what: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ConfigError(f"{what}={text!r}: not a boolean (use true or false)")


def convert(action: argparse.Action, raw: Any, key: str, what: str) -> Any:
    """``raw`` (a string from the environment, or a TOML value) as the value
    ``action`` would have stored; ConfigError naming ``what`` if it is bad."""
    flag = long_flag(action)
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        given = raw if isinstance(raw, bool) else _to_bool(str(raw), what)
        if _names(action).get(key, False):
            # The flag's name: true means "the flag is given", so
            # ``no_auto_resync = true`` is ``auto_resync = false``.
            return bool(action.const) if given else not action.const
        return given
    if isinstance(raw, bool):
        raise ConfigError(f"{what}={raw!r}: {flag} takes a value, not true/false")
    if isinstance(raw, list):
        text = ",".join(str(x) for x in raw)
    elif isinstance(raw, dict):
        raise ConfigError(f"{what}: {flag} takes a value, not a table")
    else:
        text = str(raw)
    value: Any = text
    if action.type is not None:
        try:
            value = action.type(text)  # type: ignore[operator]
        except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
            raise ConfigError(f"{what}={text!r}: invalid value for {flag}: {e}") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise ConfigError(f"{what}={text!r}: invalid choice for {flag} (choose from {choices})")
    return value


def _all_parsers(parser: argparse.ArgumentParser) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    out: list[tuple[tuple[str, ...], argparse.ArgumentParser]] = []

    def walk(p: argparse.ArgumentParser, words: tuple[str, ...]) -> None:
        out.append((words, p))
        sub = _subparsers(p)
        if sub is not None:
            seen: set[int] = set()
            for name, child in sub.choices.items():
                if id(child) not in seen:  # aliases
                    seen.add(id(child))
                    walk(child, (*words, name))

    walk(parser, ())
    return out


def find_config(argv: Sequence[str], environ: Mapping[str, str]) -> tuple[Path | None, str]:
    """The config file to read and why: ``--config FILE`` (anywhere on the
    command line), ``$SYNCREP_CONFIG``, or /etc/syncrep/syncrep.toml if present."""
    for i, token in enumerate(argv):
        if token == "--":
            break
        if token == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config: expected a file name")
            return Path(argv[i + 1]), "--config"
        if token.startswith("--config="):
            return Path(token.split("=", 1)[1]), "--config"
    env = environ.get(CONFIG_ENV, "").strip()
    if env:
        return Path(env), f"${CONFIG_ENV}"
    if DEFAULT_CONFIG_PATH.is_file():
        return DEFAULT_CONFIG_PATH, "the default path"
    return None, f"none ({DEFAULT_CONFIG_PATH} is not present)"


def load_config(path: Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The file's tables, checked: TOML, known tables, known keys."""
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {path}: larger than {MAX_CONFIG_BYTES} bytes; is it the right file?")
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: not valid TOML: {e}") from None
    every: dict[str, set[str]] = {}  # key -> commands (first word) that have it
    for words, p in _all_parsers(parser):
        for a in _settable(p):
            for name in _names(a):
                every.setdefault(name, set()).add(words[0] if words else "")
    tables = ", ".join(f"[{SECTION_TABLE}.{s}]" for s in SECTIONS)
    for key, value in doc.items():
        if isinstance(value, dict):
            if key != SECTION_TABLE:
                raise ConfigError(
                    f"config file {path}: unknown table [{key}] (tables: {tables}; other settings go at the "
                    "top, before any table)"
                )
            for name, table in value.items():
                if name not in SECTIONS or not isinstance(table, dict):
                    raise ConfigError(f"config file {path}: unknown table [{key}.{name}] (tables: {tables})")
                for sub_key in table:
                    norm = sub_key.replace("-", "_")
                    if not any(cmd in every.get(norm, ()) for cmd in SECTIONS[name]):
                        known = sorted(n for n, cmds in every.items() if cmds & set(SECTIONS[name]))
                        raise ConfigError(
                            f"config file {path}: unknown setting {sub_key!r} in [{key}.{name}]"
                            f"{_nearest(norm, known)}"
                        )
        elif key.replace("-", "_") not in every:
            raise ConfigError(f"config file {path}: unknown setting {key!r}{_nearest(key, sorted(every))}")
    return doc


def _nearest(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key.replace("-", "_"), known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _lookup(doc: Mapping[str, Any], keys: Mapping[str, bool], section: str | None) -> tuple[str, Any] | None:
    table = doc if section is None else doc.get(SECTION_TABLE, {}).get(section, {})
    found = None
    for raw_key, value in table.items():
        if isinstance(value, dict) and section is None:
            continue
        if raw_key.replace("-", "_") in keys:
            found = (raw_key.replace("-", "_"), value)
    return found


def effective(
    chain: Sequence[argparse.ArgumentParser],
    words: tuple[str, ...],
    environ: Mapping[str, str],
    doc: Mapping[str, Any] | None,
    config_path: Path | None,
) -> dict[str, tuple[Any, Source, list[argparse.Action]]]:
    """Per destination of the command ``words``: the value the environment or
    the file gives (environment first) and its source, with the actions that
    store it. Destinations neither gives are left out."""
    by_dest: dict[str, list[argparse.Action]] = {}
    for p in chain:
        for a in _settable(p):
            by_dest.setdefault(a.dest, [])
            if a not in by_dest[a.dest]:
                by_dest[a.dest].append(a)
    command = words[0] if words else ""
    sections = [s for s, cmds in SECTIONS.items() if command in cmds]
    out: dict[str, tuple[Any, Source, list[argparse.Action]]] = {}
    for dest, actions in by_dest.items():
        action = actions[-1]  # the command's own (the deepest parser)
        keys = _names(action)
        hit = None
        for key in keys:
            var = ENV_PREFIX + key.upper()
            if var in environ:
                hit = (convert(action, environ[var], key, var), Source("env", var))
                break
        if hit is None and doc is not None:
            for section in (None, *sections):
                found = _lookup(doc, keys, section)
                if found is not None:
                    key, raw = found
                    where = (f"{config_path} [{SECTION_TABLE}.{section}] {key}" if section
                             else f"{config_path} {key}")
                    hit = (convert(action, raw, key, where), Source("file", where))
        if hit is not None:
            out[dest] = (hit[0], hit[1], actions)
    return out


_UNSET = object()


def apply(parser: argparse.ArgumentParser, argv: Sequence[str], environ: Mapping[str, str]) -> Layered:
    """Make the environment's and the file's values the defaults of the
    command ``argv`` names (so a flag still wins), and find each setting's
    source. Call before ``parser.parse_args(argv)``. ConfigError: a bad value."""
    config_path, origin = find_config(argv, environ)
    doc = load_config(config_path, parser) if config_path is not None else None
    chain, words = command_chain(parser, argv)
    given = effective(chain, words, environ, doc, config_path)
    layered = Layered(config_path, origin, words)
    # Which destinations the command line sets: parse once with every default
    # replaced by a marker (defaults that are SUPPRESS stay: they never
    # overwrite a value an outer parser stored).
    saved: dict[int, tuple[argparse.Action, Any, bool]] = {}  # by id: parents share action objects
    words_only = list(argv)[: list(argv).index("--")] if "--" in argv else list(argv)
    asks_help = any(t in ("-h", "--help", "--version") for t in words_only)
    for p in chain if not asks_help else ():  # --help prints (and exits) with the defaults as they are
        for a in _settable(p):
            if a.default is not argparse.SUPPRESS and id(a) not in saved:
                saved[id(a)] = (a, a.default, a.required)
                a.default, a.required = _UNSET, False
    try:
        # --help (parsed for real later) prints the defaults the environment and the file set.
        flagged = argparse.Namespace() if asks_help else parser.parse_known_args(list(argv))[0]
    finally:
        for a, default, req in saved.values():
            a.default, a.required = default, req
    for p in chain:
        for a in _settable(p):
            if a.dest in layered.sources:
                continue
            if getattr(flagged, a.dest, _UNSET) is not _UNSET:
                layered.sources[a.dest] = Source("flag")
            elif a.dest in given:
                layered.sources[a.dest] = given[a.dest][1]
            else:
                layered.sources[a.dest] = Source("default")
    for dest, (value, _source, actions) in given.items():
        if layered.sources.get(dest) == Source("flag"):
            continue
        for a in actions:
            if a.default is not argparse.SUPPRESS:
                a.default = value
            a.required = False
    return layered


def settings_of(
    parser: argparse.ArgumentParser, words: Sequence[str], environ: Mapping[str, str], argv: Sequence[str] = ()
) -> tuple[Layered, list[Setting]]:
    """What ``syncrep config show WORDS`` prints: every setting of the command
    ``words`` (no flags: the values a command started now would get from the
    environment, the file and the defaults), with its source."""
    config_path, origin = find_config(argv, environ)
    doc = load_config(config_path, parser) if config_path is not None else None
    chain, found = command_chain(parser, list(words))
    if tuple(found) != tuple(words):
        top = _subparsers(parser)
        known = ", ".join(sorted(top.choices)) if top is not None else ""
        raise ConfigError(f"config show: {' '.join(words)!r} is not a syncrep command (commands: {known})")
    given = effective(chain, found, environ, doc, config_path)
    layered = Layered(config_path, origin, found)
    rows: dict[str, Setting] = {}
    for p in chain:
        for a in _settable(p):
            if a.dest in given:
                value, source, _ = given[a.dest]
            elif a.default is argparse.SUPPRESS:
                if a.dest in rows:
                    continue
                value, source = None, Source("default")
                for outer in chain:
                    for b in _settable(outer):
                        if b.dest == a.dest and b.default is not argparse.SUPPRESS:
                            value = b.default
            else:
                value, source = a.default, Source("default")
                if isinstance(value, str) and a.type is not None:
                    try:
                        value = a.type(value)  # type: ignore[operator]
                    except (argparse.ArgumentTypeError, ValueError, TypeError):
                        pass
            rows[a.dest] = Setting(a.dest, long_flag(a), value, source)
    return layered, list(rows.values())


def show_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value) if value != "" else '""'


def env_name(dest: str) -> str:
    return ENV_PREFIX + dest.upper()


def environ() -> Mapping[str, str]:
    return os.environ
