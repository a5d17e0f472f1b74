"""One table per service: each row a setting (its config field, env var, flag, type and help).

A service's config is a frozen dataclass; its table (``SETTINGS`` on the class) is the only place
that names the env var and the flag of each field. :func:`from_env` builds the config from the
environment, :func:`add_flags` adds the mirroring command-line options, and :func:`apply_flags`
lays the flags given over a config. Defaults live on the dataclass only; help texts show them.
Adding a setting is one field on the dataclass and one row in its table; README's configuration
table is generated from the same rows (:func:`markdown_table`, checked by ``tests/test_settings.py``).

Fields may be nested: ``"backend.max_batch"`` is ``config.backend.max_batch``. An env var set to
the empty string counts as unset.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

C = TypeVar("C")

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def parse_bool(text: str) -> bool:
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"not a yes/no value: {text!r} (use {'/'.join(TRUE_WORDS)} or {'/'.join(FALSE_WORDS)})")


def parse_finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"must be finite, got {text!r}")
    return value


def parse_url_list(text: str) -> tuple[str, ...]:
    """``nats://a:4222,nats://b:4222``: every server of a cluster."""
    urls = tuple(u.strip() for u in text.split(",") if u.strip())
    if not urls:
        raise ValueError("no URL given")
    return urls


def parse_names_list(text: str) -> tuple[str, ...]:
    """``a,b``: a comma list of names (empty items dropped; may be empty)."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


def parse_port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise ValueError(f"a port is 0..65535, got {port}")
    return port


@dataclass(frozen=True, slots=True)
class Setting:
    #: the config field, dotted for a nested one ("backend.max_batch")
    field: str
    env: str
    #: the command-line option ("--max-batch"); None: env var only
    flag: str | None
    #: text (env var or flag) -> value
    parse: Callable[[str], Any]
    help: str
    choices: Sequence[str] | None = None
    #: what help and README show as the default, where the field's own default does not say it
    default_text: str | None = None
    #: a yes/no setting: the flag is ``--x/--no-x``
    boolean: bool = False
    #: older names still accepted: flags (``--kv-tokens``) and env vars (read when ``env`` is unset)
    flag_aliases: tuple[str, ...] = ()
    env_aliases: tuple[str, ...] = ()

    @property
    def dest(self) -> str:
        """The argparse attribute the flag sets."""
        assert self.flag is not None
        return self.flag.lstrip("-").replace("-", "_")


def nested(prefix: str, table: Iterable[Setting]) -> tuple[Setting, ...]:
    """``table``'s settings for a config held in field ``prefix`` of another."""
    return tuple(dataclasses.replace(s, field=f"{prefix}.{s.field}") for s in table)


def get_path(obj: object, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def with_values(config: C, values: Mapping[str, Any]) -> C:
    """``config`` with the (dotted) fields in ``values`` replaced, one :func:`dataclasses.replace`
    per nested config (so each config's own checks run once on the result)."""
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for path, value in values.items():
        head, _, rest = path.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            top[head] = value
    for head, inner in nested.items():
        top[head] = with_values(getattr(config, head), inner)
    return dataclasses.replace(config, **top) if top else config  # type: ignore[type-var]


def settings_of(cls: type) -> tuple[Setting, ...]:
    table: tuple[Setting, ...] = cls.SETTINGS  # type: ignore[attr-defined]
    return table


def from_env(cls: type[C], env: Mapping[str, str] | None = None) -> C:
    """A ``cls`` config from the environment: each setting whose env var is set, over the defaults."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for s in settings_of(cls):
        for name in (s.env, *s.env_aliases):
            raw = env.get(name, "").strip()
            if raw:
                values[s.field] = _parse(s, raw, name)
                break
    return with_values(cls(), values)


def _parse(s: Setting, raw: str, where: str) -> Any:
    try:
        value = s.parse(raw)
    except ValueError as exc:
        raise ValueError(f"{where}={raw!r}: {exc}") from None
    if s.choices is not None and value not in s.choices:
        raise ValueError(f"{where}={raw!r}: expected one of {', '.join(s.choices)}")
    return value


def default_text(cls: type, s: Setting) -> str:
    if s.default_text is not None:
        return s.default_text
    value = get_path(cls(), s.field)
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return "none" if value is None else str(value)


def add_flags(
    parser: argparse.ArgumentParser, classes: Iterable[type], skip: Iterable[str] = (), seen: set[str] | None = None
) -> None:
    """Add the flags of every setting of ``classes`` (a flag shared by two tables, with the same env
    var, once); flags in ``skip`` (or already in ``seen``) are left to the caller."""
    seen = set(skip) if seen is None else seen | set(skip)
    for cls in classes:
        for s in settings_of(cls):
            if s.flag is None or s.flag in seen:
                continue
            seen.add(s.flag)
            seen.update(s.flag_aliases)
            env = " or ".join((s.env, *s.env_aliases))
            help_text = f"{s.help} (env {env}; default {default_text(cls, s)})".replace("%", "%%")
            flags = (s.flag, *s.flag_aliases)
            if s.boolean:
                parser.add_argument(*flags, dest=s.dest, action=argparse.BooleanOptionalAction, default=None,
                                    help=help_text)
            else:
                parser.add_argument(*flags, dest=s.dest, type=s.parse, choices=s.choices, default=None,
                                    help=help_text, metavar=None if s.choices else s.dest.upper())


def apply_flags(config: C, args: argparse.Namespace, skip: Iterable[str] = ()) -> C:
    """``config`` with the value of every flag of its table that was given on the command line."""
    skipped = set(skip)
    values: dict[str, Any] = {}
    for s in settings_of(type(config)):
        if s.flag is None or s.flag in skipped:
            continue
        value = getattr(args, s.dest, None)
        if value is not None:
            values[s.field] = value
    return with_values(config, values)


def from_env_and_flags(cls: type[C], args: argparse.Namespace, skip: Iterable[str] = ()) -> C:
    """The effective config of a service started from the command line: defaults, then the
    environment, then the flags given."""
    return apply_flags(from_env(cls), args, skip)


#: the metrics port's row in the tracker's, the schedulers' and the engines' tables
METRICS_PORT = Setting("metrics_port", "AUTELLIX_METRICS_PORT", "--metrics-port", parse_port,
                       "Prometheus metrics on this port, 0 = any free one", default_text="off")
