"""sd_notify: tell systemd (``Type=notify`` units) that a process is ready,
reloading or stopping, and what it is doing.

Why our own: the protocol is one datagram of ``KEY=VALUE`` lines to the
AF_UNIX socket named by ``$NOTIFY_SOCKET`` (sd_notify(3)); a dozen lines of
stdlib do it, where the C library would need a binding and python-systemd a
compiler and libsystemd headers in every image. An address that starts with
``@`` is in the abstract namespace (a leading NUL byte on the wire).

Every call is a no-op returning False when ``$NOTIFY_SOCKET`` is unset (not
run by systemd: a shell, a container, the tests' harness), and a failure to
send is logged at DEBUG and returns False: readiness reporting must never
stop a process that is otherwise serving. The units that use it:
``deploy/systemd/`` (docs/DEPLOY.md).
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)

#: The environment variable systemd sets for ``Type=notify`` services.
NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"


def _address(raw: str) -> str | bytes:
    # "@name" is the abstract namespace: the kernel name starts with a NUL byte.
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    return raw


def notify(state: str) -> bool:
    """Send ``state`` (newline-separated ``KEY=VALUE`` assignments, e.g.
    ``"READY=1\\nSTATUS=serving"``) to ``$NOTIFY_SOCKET``. True when sent;
    False when the variable is unset or the send failed."""
    raw = os.environ.get(NOTIFY_SOCKET_ENV, "")
    if not raw:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(_address(raw))
            s.sendall(state.encode())
    except OSError as e:
        log.debug("sd_notify to %s failed: %s", raw, e)
        return False
    return True


def _one_line(text: str) -> str:
    # A newline would start a new assignment: STATUS is one line.
    return " ".join(text.split())


def ready(status: str = "") -> bool:
    """The process serves: ``READY=1`` (systemd ends ``systemctl start``),
    with an optional ``STATUS=`` line shown by ``systemctl status``."""
    state = "READY=1"
    if status:
        state += f"\nSTATUS={_one_line(status)}"
    return notify(state)


def reloading() -> bool:
    """A reload started (SIGHUP): ``RELOADING=1``; follow it with :func:`ready`."""
    return notify("RELOADING=1")


def stopping() -> bool:
    """A graceful stop started (SIGTERM): ``STOPPING=1``."""
    return notify("STOPPING=1")


def status(text: str) -> bool:
    """What the process is doing now, for ``systemctl status`` (one line)."""
    return notify(f"STATUS={_one_line(text)}")
