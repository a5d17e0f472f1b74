"""An authenticated mesh with least privilege: one NATS identity per role, permissions per subject.

A priority scheduler is only as honest as the messages it reads. With auth on (the default of
``autellix up``), nats-server itself refuses what a role has no business doing, before any service
sees it:

==========  ======================================================================================
role        may publish / may subscribe
==========  ======================================================================================
client      submit calls, abort its own calls, end its own programs (each on ``<subject>.<user>``,
            its own name only), read the process table (request/reply) /
            its own inbox prefix ``_I.<user>.>`` only
gateway     what a client may, and read engine heartbeats (``/v1/models``, ``/ready``)
scheduler   stamped calls to engines, dispatched events, replies to callers /
            submissions (queue group), hand-backs, heartbeats, completed events, service updates
engine      heartbeats, completed events, hand-backs, replies to callers / its stamped calls,
            aborts, service updates
tracker     service updates, JetStream (its key-value bucket), request replies / completed and
            dispatched events, program end and table requests
==========  ======================================================================================

So: only engines publish completed events and heartbeats (no fake engine can swallow calls, no
fake event can add service to a victim); only the tracker publishes service updates; only
schedulers publish to engine subjects (no client can hand an engine a call stamped -1e9); no client
reads another's prompts or token streams (each reads only its own inbox prefix, and events are not
readable by clients at all).

**Ownership.** A caller publishes submissions, aborts and program ends on ``<subject>.<user>`` and
may use no other user's name, so the user token is proof of who sent it. The scheduler stamps the
call with its ``owner`` and accepts only a ``reply_to`` inside the owner's inbox prefix (a stream
can never be pointed at someone else's inbox); engines honour an abort on ``call.abort.<user>``
only for that user's calls; the tracker records a program's owner from its first call and ends it
only on that owner's request. Schedulers (and, without auth, anyone) abort on plain ``call.abort``.

**Identities** are NATS users with random passwords, written by :func:`write_server_config` into a
nats-server configuration file (mode 0600, in the server's own temporary directory). Each service
connects with a URL carrying its role's user and password (``nats://scheduler:...@host:port``);
:func:`redact_url` is what every log line shows instead. A client's credentials are a one-line file
holding its URL (mode 0600), named in ``autellix up``'s readiness line and read with ``--creds`` /
``AUTELLIX_NATS_CREDS``. Plain user/password keeps the dependency list short (nats-py needs the
``nkeys`` package for nkeys); the subjects and permissions would be the same with nkeys or JWTs.

Inboxes: every connection uses the inbox prefix ``_I.<user>`` (:func:`inbox_prefix`), which is what
the permissions grant, so request/reply and JetStream keep working under auth.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from autellix.proto import Subjects
from autellix.proto.limits import is_token

ROLES: tuple[str, ...] = ("client", "gateway", "scheduler", "engine", "tracker")

#: inboxes of every identity live under this prefix; ``_I.<user>.>`` is one identity's
INBOX_ROOT = "_I"


def inbox_prefix(user: str | None) -> str:
    """The inbox prefix a connection as ``user`` uses (nats-py's default when there is no user)."""
    return f"{INBOX_ROOT}.{user}" if user else "_INBOX"


@dataclass(frozen=True, slots=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    #: may answer requests made to it (one reply per request, to the requester's inbox)
    allow_responses: bool = False


def role_permissions(role: str, subjects: Subjects, user: str) -> Permissions:
    """What one role may publish and subscribe to, under one deployment root."""
    s = subjects
    own_inbox = f"{inbox_prefix(user)}.>"
    any_inbox = f"{INBOX_ROOT}.>"
    engine_calls = f"{s.root}.engine.*.calls"
    # callers publish under their own user name only: the subject says who sent it (Subjects.sender)
    as_user = (s.call_submit_as(user), s.call_abort_as(user), s.program_end_as(user), s.tracker_table)
    if role == "client":
        return Permissions(publish=as_user, subscribe=(own_inbox,))
    if role == "gateway":
        return Permissions(publish=as_user, subscribe=(own_inbox, s.engine_heartbeat))
    if role == "scheduler":
        return Permissions(
            publish=(engine_calls, s.call_dispatched, s.any_slot(s.call_dispatched), s.call_abort, any_inbox),
            subscribe=(
                own_inbox,
                s.call_submit,
                f"{s.call_submit}.*",
                s.call_handback,
                s.engine_heartbeat,
                s.call_completed,
                s.any_slot(s.call_completed),
                s.program_service,
            ),
        )
    if role == "engine":
        return Permissions(
            publish=(s.engine_heartbeat, s.call_completed, s.any_slot(s.call_completed), s.call_handback, any_inbox),
            subscribe=(own_inbox, engine_calls, s.call_abort, f"{s.call_abort}.*", s.program_service, s.program_ended),
        )
    if role == "tracker":
        return Permissions(
            # the slotted event subjects too: a tracker forwards events from older publishers to their shard
            publish=(
                s.program_service,
                s.program_ended,
                s.any_slot(s.call_completed),
                s.any_slot(s.call_dispatched),
                "$JS.API.>",
                "$KV.>",
                "$JS.ACK.>",
            ),
            subscribe=(
                own_inbox,
                s.call_completed,
                s.any_slot(s.call_completed),
                s.call_dispatched,
                s.any_slot(s.call_dispatched),
                s.engine_heartbeat,  # engines that die: their calls leave the active counts
                s.program_end,
                f"{s.program_end}.*",
                s.tracker_table,
            ),
            allow_responses=True,
        )
    raise ValueError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")


@dataclass(frozen=True, slots=True)
class Identity:
    role: str
    user: str
    password: str

    def url(self, server_url: str) -> str:
        """``server_url`` with this identity's user and password in it."""
        return with_credentials(server_url, self.user, self.password)


def make_identities(roles: Iterable[str] = ROLES, clients: Iterable[str] = ("client",)) -> dict[str, Identity]:
    """Identities by user name, each with a fresh random password: one per service role (the user
    named after the role), and one client identity per name in ``clients`` (each its own owner,
    and later its own tenant)."""
    out: dict[str, Identity] = {}
    for role in roles:
        for user in clients if role == "client" else (role,):
            if not is_token(user):
                raise ValueError(f"user name {user!r} must be one NATS subject token")
            out[user] = Identity(role=role, user=user, password=secrets.token_urlsafe(24))
    return out


def _conf_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _conf_list(values: Iterable[str]) -> str:
    return "[" + ", ".join(_conf_string(v) for v in values) + "]"


def server_config(identities: dict[str, Identity], subjects: Subjects) -> str:
    """The ``authorization`` block of a nats-server configuration for these identities."""
    lines = ["authorization {", "  users = ["]
    for ident in identities.values():
        perms = role_permissions(ident.role, subjects, ident.user)
        lines.append("    {")
        lines.append(f"      user: {_conf_string(ident.user)}")
        lines.append(f"      password: {_conf_string(ident.password)}")
        lines.append("      permissions: {")
        lines.append(f"        publish: {{ allow: {_conf_list(perms.publish)} }}")
        lines.append(f"        subscribe: {{ allow: {_conf_list(perms.subscribe)} }}")
        if perms.allow_responses:
            lines.append("        allow_responses: true")
        lines.append("      }")
        lines.append("    }")
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


def write_private(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` readable by its owner only (created so, never world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)
    return path


def write_credentials(path: Path, url: str) -> Path:
    """A client's credentials file: one line, its NATS URL with user and password."""
    return write_private(path, url + "\n")


def read_credentials(path: str | Path) -> str:
    """The NATS URL in a credentials file written by :func:`write_credentials`."""
    text = Path(path).read_text().strip()
    if not text.startswith(("nats://", "tls://")) or "@" not in text:
        raise ValueError(f"{path} is not an Autellix credentials file (one line: nats://user:password@host:port)")
    return text


def with_credentials(url: str, user: str, password: str) -> str:
    """Each server of a (comma-separated) NATS URL list, with ``user:password@`` in it."""
    out = []
    for one in url.split(","):
        parts = urlsplit(one.strip())
        host = parts.hostname or "127.0.0.1"
        netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
        if parts.port:
            netloc += f":{parts.port}"
        out.append(urlunsplit((parts.scheme or "nats", netloc, parts.path, parts.query, parts.fragment)))
    return ",".join(out)


def url_user(url: str) -> str | None:
    """The user a NATS URL (the first of a list) connects as, or None."""
    user = urlsplit(url.split(",")[0].strip()).username
    return unquote(user) if user else None


def redact_url(url: str) -> str:
    """A NATS URL (list) fit for a log line: any password replaced by ``***``."""
    out = []
    for one in url.split(","):
        parts = urlsplit(one.strip())
        if parts.password is None and "@" not in parts.netloc:
            out.append(one.strip())
            continue
        host = parts.netloc.rsplit("@", 1)[1]
        user = parts.username or ""
        out.append(urlunsplit((parts.scheme, f"{user}:***@{host}" if user else f"***@{host}", parts.path, "", "")))
    return ",".join(out)


def default_credentials_path() -> Path:
    """Where ``autellix up`` writes the client's credentials unless told otherwise."""
    cache = Path(os.environ.get("AUTELLIX_CACHE", "~/.cache/autellix")).expanduser()
    return cache / "credentials" / "client.creds"


def init_deployment(directory: Path, subjects: Subjects, host: str = "nats:4222") -> dict[str, Path]:
    """Write a deployment's secrets: ``nats-auth.conf`` (nats-server's ``authorization`` block: run
    the server with ``-c`` on it, or include it) and one ``<role>.creds`` per role holding
    ``nats://<role>:<password>@<host>``. Returns the files written, by role (and ``"server"``)."""
    identities = make_identities()
    out = {"server": write_private(directory / "nats-auth.conf", server_config(identities, subjects))}
    for role, ident in identities.items():
        out[role] = write_credentials(directory / f"{role}.creds", ident.url(f"nats://{host}"))
    return out
