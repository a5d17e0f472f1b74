"""README's configuration table, made from the services' settings tables.

``python -m autellix.services.config_doc`` prints it (``--write README.md`` replaces README's copy);
``tests/test_settings.py`` fails when README's copy differs, or when the code reads an ``AUTELLIX_*``
variable the table does not list.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .engine.config import EngineConfig
from .gateway.config import GatewayConfig
from .nats_config import NatsConfig
from .scheduler.config import SchedulerConfig
from .settings import Setting, default_text, settings_of
from .tracker.config import TrackerConfig

SERVICES: dict[str, type] = {
    "tracker": TrackerConfig,
    "scheduler": SchedulerConfig,
    "engine": EngineConfig,
    "gateway": GatewayConfig,
}

#: variables read outside the services' configs: (env var, flag, default, who: what)
PROCESS_WIDE: tuple[tuple[str, str, str, str], ...] = (
    ("AUTELLIX_LOG_LEVEL", "`--log-level`", "`info`", "all: log level (JSON lines on stderr when not a TTY)"),
    ("AUTELLIX_METRICS_HOST", "", "`0.0.0.0`",
     "tracker, scheduler, engine: metrics listen address (`autellix up`: its `--host`)"),
    ("AUTELLIX_CACHE", "", "`~/.cache/autellix`",
     "engine: converted model cache; `autellix up`: where it writes the client's credentials"),
)

BEGIN = "<!-- config table: `python -m autellix.services.config_doc --write README.md`; tests check it -->"
END = "<!-- end of config table -->"


def _aliases(names: tuple[str, ...]) -> str:
    return "".join(f" (alias `{name}`)" for name in names)


def _flag(s: Setting) -> str:
    if s.flag is None:
        return ""
    return (f"`{s.flag}` / `--no-{s.flag[2:]}`" if s.boolean else f"`{s.flag}`") + _aliases(s.flag_aliases)


def _meaning(s: Setting) -> str:
    return s.help + (f" ({', '.join(f'`{c}`' for c in s.choices)})" if s.choices else "")


def table_rows() -> list[str]:
    """One row per setting; a setting several services share (same env var and meaning) once."""
    rows: dict[tuple[str, str], tuple[Setting, str, list[str]]] = {}
    nats_fields = {f"nats.{s.field}" for s in settings_of(NatsConfig)}
    for s in settings_of(NatsConfig):
        rows[(s.env, s.help)] = (s, default_text(NatsConfig, s), ["all"])
    for name, cls in SERVICES.items():
        for s in settings_of(cls):
            if s.field in nats_fields:
                continue
            rows.setdefault((s.env, s.help), (s, default_text(cls, s), []))[2].append(name)
    out = [
        f"| `{s.env}`{_aliases(s.env_aliases)} | {_flag(s)} | {default} | {', '.join(who)}: {_meaning(s)} |"
        for s, default, who in rows.values()
    ]
    out += [f"| `{env}` | {flag} | {default} | {text} |" for env, flag, default, text in PROCESS_WIDE]
    return out


def markdown_table() -> str:
    head = ["| env var | flag | default | service: meaning |", "|---|---|---|---|"]
    return "\n".join([BEGIN, *head, *table_rows(), END])


def rewrite(path: Path) -> None:
    """Replace the table in ``path`` (README.md) by the generated one."""
    text = path.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    path.write_text(text[:start] + markdown_table() + text[end:])


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write"]:
        rewrite(Path(sys.argv[2] if len(sys.argv) > 2 else "README.md"))
    else:
        print(markdown_table())
