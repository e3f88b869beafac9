"""The one place that builds every gRPC server and channel.

Every process (coordinator, nodes, CLI clients, tests) gets its servers and
channels here, so message-size limits, keepalives, health checking, reflection
and — later — mutual TLS are configured once.

Limits are explicit and named with units:

* ``MAX_MESSAGE_BYTES``: the largest gRPC message either side accepts: room
  for one maximal write (``syncrep.core.vocab.MAX_WRITE_BYTES``, 4 MiB) plus
  protobuf framing. A larger message is refused with RESOURCE_EXHAUSTED by
  gRPC itself, before it reaches any handler.
* ``DEFAULT_RPC_TIMEOUT_S``: the deadline of every unary call unless the caller
  passes a better one. Streams carry their own liveness checks.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from syncrep.pb import syncrep_pb2

log = logging.getLogger(__name__)


class Transport(Protocol):
    """Where servers and channels come from: real gRPC sockets (the default,
    ``transport`` is None) or an in-memory network with fault hooks
    (``deploy/simnet.py``, used by the deterministic simulator). The product
    code never knows which: it only calls ``Server`` and ``channel`` below."""

    def server(self, listen: str) -> Any: ...

    def channel(self, address: str) -> Any: ...


#: The transport in use; None = real gRPC. Set only by the simulator (one per process).
transport: Transport | None = None

# 4 MiB (the largest write, syncrep.core.vocab.MAX_WRITE_BYTES) + 64 KiB of
# protobuf framing, or a batch of small writes. The foundation does not import
# the core, so the figure is written out; tests/test_vocab.py checks the two.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024 + 64 * 1024
DEFAULT_RPC_TIMEOUT_S = 5.0
SHUTDOWN_GRACE_S = 5.0
KEEPALIVE_TIME_S = 10.0
KEEPALIVE_TIMEOUT_S = 5.0

_COMMON_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", int(KEEPALIVE_TIME_S * 1000)),
    ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT_S * 1000)),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]

_SERVER_OPTIONS: list[tuple[str, Any]] = [
    *_COMMON_OPTIONS,
    ("grpc.http2.min_ping_interval_without_data_ms", 5000),
    ("grpc.so_reuseport", 0),
]

SERVICE_NAMES = [d.full_name for d in syncrep_pb2.DESCRIPTOR.services_by_name.values()]


class Server:
    """A grpc.aio server with health checking and reflection.

    ``add`` registers servicers (``add(pb2_grpc.add_FooServicer_to_server, impl)``),
    ``start`` binds and starts, ``stop`` is graceful: in-flight RPCs get
    ``grace_s`` seconds to finish.
    """

    def __init__(self, listen: str) -> None:
        self.listen = listen
        self.server = aio.server(options=_SERVER_OPTIONS) if transport is None else transport.server(listen)
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._services: list[str] = [health.SERVICE_NAME, reflection.SERVICE_NAME]
        self.port = 0

    def add(self, adder: Callable[[Any, Any], None], servicer: Any, *service_names: str) -> None:
        adder(servicer, self.server)
        self._services.extend(service_names)

    async def start(self) -> int:
        reflection.enable_server_reflection(self._services, self.server)
        try:
            self.port = self.server.add_insecure_port(self.listen)
        except RuntimeError as e:  # grpcio >= 1.6x raises instead of returning 0
            raise OSError(f"cannot listen on {self.listen}: {e}") from None
        if self.port == 0:
            raise OSError(f"cannot listen on {self.listen}: address in use or not available")
        await self.server.start()
        await self.set_serving(True)
        return self.port

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self._services]:
            r = self.health.set(name, status)
            if asyncio.iscoroutine(r):
                await r

    async def stop(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        await self.set_serving(False)
        await self.server.stop(grace_s)


def channel(address: str) -> aio.Channel:
    """An insecure grpc.aio channel to ``address`` with our limits and keepalives."""
    if transport is not None:
        return transport.channel(address)
    return aio.insecure_channel(address, options=_COMMON_OPTIONS)


def sync_channel(address: str) -> grpc.Channel:
    """A blocking channel, for CLI tools that do not run an event loop."""
    return grpc.insecure_channel(address, options=_COMMON_OPTIONS)


async def wait_for_signal(signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT)) -> int:
    """Block until one of ``signals`` arrives; return its number."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[int] = loop.create_future()
    def fire(s: int) -> None:
        if not fut.done():
            fut.set_result(s)

    for sig in signals:
        loop.add_signal_handler(sig, fire, sig)
    try:
        return await fut
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


async def health_check(address: str, timeout_s: float = 1.0) -> bool:
    """True when the server at ``address`` answers SERVING within ``timeout_s``."""
    try:
        async with channel(address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
    except (grpc.RpcError, OSError):
        return False


def status_name(code: int) -> str:
    for c in grpc.StatusCode:
        if c.value[0] == code:
            return str(c.name)
    return f"STATUS_{code}"


def code_value(code: grpc.StatusCode) -> int:
    return int(code.value[0])
