"""Settings from a TOML file and the environment, under the command line's flags.

``shiza node run --config node.toml`` (and ``shiza gateway --config``) read the file with
``tomllib``: every flag of the command has a key, its long name with dashes or underscores
(``peer-max-sessions = 16``, ``bootstrap = ["/ip4/..."]``, ``no-direct = true``). Precedence,
highest first: flags, environment variables ``SHIZA_*`` (``ENVIRONMENT`` below), the file, the
built-in defaults. ``--print-config`` prints the effective settings as TOML and exits, so an
operator sees what a node would run with. An unknown key, a value of the wrong type or an
unreadable file is a usage error naming the file and the key.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = ["ENVIRONMENT", "ConfigError", "add_config_flags", "apply_settings", "render_toml"]

# Environment variable -> the flag's destination it sets (where the command has that flag).
ENVIRONMENT = {
    "SHIZA_HOME": "data_dir",
    "SHIZA_BOOTSTRAP": "bootstrap",  # several: separated by commas or whitespace
    "SHIZA_SWARM_KEY": "swarm_key",
    "SHIZA_MODEL": "model",
    "SHIZA_LISTEN": "listen",
    "SHIZA_LOG_LEVEL": "log_level",
    "SHIZA_LOG_FORMAT": "log_format",
}

# Destinations that are not settings (they act, or belong to the command line alone).
_NOT_SETTINGS = {"help", "config", "print_config", "command", "version", "func"}


class ConfigError(ValueError):
    """A config file or environment variable that cannot be used (a usage error)."""


def add_config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="read settings from this TOML file (every flag has a key; flags override it)")
    p.add_argument("--print-config", action="store_true",
                   help="print the effective settings (flags, SHIZA_* environment, file, defaults) as TOML and exit")


def _settings(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """dest -> action of every flag of ``p`` that is a setting."""
    out = {}
    for action in p._actions:  # argparse has no public list of a parser's actions
        if not action.option_strings or action.dest in _NOT_SETTINGS:
            continue
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        out[action.dest] = action
    return out


def _convert(action: argparse.Action, value: Any, where: str) -> Any:
    """``value`` from TOML or the environment as the flag would have parsed it."""
    many = isinstance(action, argparse._AppendAction)
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "0", "false", "no"):
            value = value.lower() in ("1", "true", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: must be true or false, got {value!r}")
        return value if isinstance(action, argparse._StoreTrueAction) else not value
    if isinstance(action, argparse._CountAction):
        if type(value) is not int or value < 0:
            raise ConfigError(f"{where}: must be an integer >= 0, got {value!r}")
        return value
    items = value if isinstance(value, list) else [value]
    if not many and isinstance(value, list):
        raise ConfigError(f"{where}: takes one value, got a list")
    out = []
    for item in items:
        if isinstance(item, (dict, list)):
            raise ConfigError(f"{where}: must be a plain value, got {type(item).__name__}")
        text = str(item).lower() if isinstance(item, bool) else str(item)
        try:
            got = action.type(text) if action.type is not None else text
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        except (TypeError, ValueError):  # int(), float(): say it as argparse would
            kind = getattr(action.type, "__name__", "")
            raise ConfigError(f"{where}: invalid {kind} value {item!r}") from None
        if action.choices is not None and got not in action.choices:
            raise ConfigError(f"{where}: must be one of {', '.join(map(str, action.choices))}, got {item!r}")
        out.append(got)
    return out if many else out[0]


def read_file(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return data


def apply_settings(p: argparse.ArgumentParser, config: Path | None, environ: Mapping[str, str]) -> None:
    """Make the file's and the environment's values ``p``'s defaults (flags still override)."""
    actions = _settings(p)
    defaults: dict[str, Any] = {}
    if config is not None:
        for key, value in read_file(config).items():
            dest = key.replace("-", "_")
            if dest not in actions:
                raise ConfigError(f"{config}: unknown key {key!r} (`{p.prog} --print-config` lists the keys)")
            defaults[dest] = _convert(actions[dest], value, f"{config}: {key}")
    for name, dest in ENVIRONMENT.items():
        text = environ.get(name)
        if text is None or text == "" or dest not in actions:
            continue
        action = actions[dest]
        value: Any = text.replace(",", " ").split() if isinstance(action, argparse._AppendAction) else text
        defaults[dest] = _convert(action, value, f"environment variable {name}")
    if defaults:
        p.set_defaults(**defaults)


def render_toml(p: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The effective settings of ``args`` as a TOML document ``--config`` reads back."""
    lines = [f"# effective settings of `{p.prog}` (flags > SHIZA_* environment > --config file > defaults)"]
    unset = []
    for dest, action in sorted(_settings(p).items()):
        key = action.option_strings[-1].lstrip("-")
        value = getattr(args, dest, None)
        if isinstance(action, argparse._StoreFalseAction):
            value = not value
        if value is None:
            unset.append(key)
            continue
        if "api_key" in dest and not dest.endswith("_file"):  # secrets are never printed
            if value:
                lines.append(f"# {key} = ({len(value)} given; not shown)")
            continue
        lines.append(f"{key} = {_toml_value(value)}")
    lines += [f"# {key} = (not set)" for key in unset]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, tuple):  # a parsed pair such as --layers START:END, as it is written
        return _toml_value(":".join(map(str, value)))
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def find_parser(root: argparse.ArgumentParser, words: Iterable[str]) -> argparse.ArgumentParser:
    """The (sub)parser of the command ``words`` (e.g. ("node", "run"))."""
    p = root
    for word in words:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction) and word in action.choices:
                p = action.choices[word]
                break
    return p


def environ() -> Mapping[str, str]:
    return os.environ
