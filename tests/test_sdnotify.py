"""syncrep.sdnotify against a real AF_UNIX datagram socket standing in for
systemd's $NOTIFY_SOCKET: a path, and an abstract-namespace name ('@...').
Nothing is random here (no seed)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from syncrep import sdnotify

RECV_TIMEOUT_S = 2.0


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = tmp_path / "notify.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(RECV_TIMEOUT_S)
    try:
        yield str(path), s
    finally:
        s.close()


@pytest.fixture
def abstract_socket() -> Iterator[tuple[str, socket.socket]]:
    name = f"syncrep-test-notify-{os.getpid()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(b"\0" + name.encode())
    s.settimeout(RECV_TIMEOUT_S)
    try:
        yield "@" + name, s
    finally:
        s.close()


def test_ready_over_a_path_socket(path_socket: tuple[str, socket.socket],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    addr, s = path_socket
    monkeypatch.setenv("NOTIFY_SOCKET", addr)
    assert sdnotify.ready("serving on 127.0.0.1:7001")
    assert s.recv(4096) == b"READY=1\nSTATUS=serving on 127.0.0.1:7001"


def test_ready_over_an_abstract_socket(abstract_socket: tuple[str, socket.socket],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    addr, s = abstract_socket
    monkeypatch.setenv("NOTIFY_SOCKET", addr)
    assert sdnotify.notify("READY=1")
    assert s.recv(4096) == b"READY=1"


def test_every_message(path_socket: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch) -> None:
    addr, s = path_socket
    monkeypatch.setenv("NOTIFY_SOCKET", addr)
    assert sdnotify.ready()
    assert s.recv(4096) == b"READY=1"
    # A status is one line: a newline would be read as a new assignment.
    assert sdnotify.status("registered with\ncoordinator  c:7000")
    assert s.recv(4096) == b"STATUS=registered with coordinator c:7000"
    assert sdnotify.reloading()
    assert s.recv(4096) == b"RELOADING=1"
    assert sdnotify.stopping()
    assert s.recv(4096) == b"STOPPING=1"


def test_unset_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready("x") is False
    assert sdnotify.stopping() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert sdnotify.notify("READY=1") is False


def test_missing_socket_returns_false_without_raising(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The fault: systemd's socket is gone (or never existed); the process must carry on."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "absent.sock"))
    assert sdnotify.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", f"@syncrep-test-absent-{os.getpid()}")
    assert sdnotify.ready() is False
