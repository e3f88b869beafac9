"""The one place that builds every gRPC server and channel.

Every process (coordinator, nodes, CLI clients, tests) gets its servers and
channels here, so message-size limits, keepalives, health checking, reflection
and mutual TLS are configured once.

Security (docs/SECURITY.md): a process calls :func:`configure` once at start
with its :class:`Security` (``--certs-dir`` or ``--insecure``). With a certs
dir, every server requires a client certificate signed by ``ca.crt``
(``ssl_server_credentials(..., require_client_auth=True)``, through gRPC's
dynamic credentials so that :func:`reload` -- SIGHUP -- takes new files for
new connections without touching the ones in flight), and every channel
presents this process's certificate (nodes and coordinators: ``node.crt``; CLI
commands: ``client.USER.crt``) and verifies the server's SAN against the
address it dials (gRPC's own check of the target host). Without
:func:`configure` (in-process use: unit tests, the simulator) everything is
plaintext, as with ``--insecure``.

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
import contextlib
import inspect
import logging
import signal
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from syncrep import certs, sdnotify
from syncrep.pb import syncrep_pb2

log = logging.getLogger(__name__)


class Transport(Protocol):
    """Where servers and channels come from: real gRPC sockets (the default,
    ``transport`` is None) or an in-memory network with fault hooks
    (``deploy/simnet.py``, used by the deterministic simulator). The product
    code never knows which: it only calls ``Server`` and ``channel`` below."""

    def server(self, listen: str, interceptors: Sequence[Any] = ()) -> Any: ...

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


# ---------------------------------------------------------------- security


@dataclass(frozen=True)
class Security:
    """How this process authenticates. ``certs_dir`` None: plaintext
    (``--insecure``). ``user`` "": present the node certificate (nodes and
    coordinators); else ``client.USER.crt`` (CLI commands)."""

    certs_dir: Path | None
    user: str = ""

    @property
    def insecure(self) -> bool:
        return self.certs_dir is None

    def describe(self) -> str:
        if self.certs_dir is None:
            return "plaintext (--insecure)"
        who = f"client certificate of user {self.user!r}" if self.user else "node certificate"
        return f"mutual TLS with the {who} from {self.certs_dir}"


#: This process's security; None: not configured (in-process use: plaintext).
security: Security | None = None
_lock = threading.Lock()
#: Bumped by reload(): servers take new certificates at their next handshake.
_generation = 0
_channel_creds: grpc.ChannelCredentials | None = None


def configure(sec: Security | None) -> None:
    """Set this process's security (once at start; tests may switch it).
    With a certs dir, the files are loaded and checked now, so that a missing
    or unreadable certificate or key stops the process at start with a
    message saying which file and how to make it (certs.CertError)."""
    global security, _channel_creds, _generation
    if sec is not None and sec.certs_dir is not None:
        _load_tls(sec)  # raises CertError
    with _lock:
        security = sec
        _channel_creds = None
        _generation += 1


def reload() -> str:
    """Re-read the certificates (SIGHUP): new channels and new server
    connections use them; connections in flight keep theirs. Returns what
    was done; a broken new file is refused (CertError) and the old ones stay."""
    global _channel_creds, _generation
    sec = security
    if sec is None or sec.certs_dir is None:
        # The hooks still run: a plaintext coordinator may talk TLS to etcd (etcds://).
        done = ["no gRPC certificates to reload (plaintext)"]
    else:
        files = _load_tls(sec)
        with _lock:
            _channel_creds = None
            _generation += 1
        done = [f"certificates reloaded from {sec.certs_dir} ({files.cert_path.name}, CN {files.name!r})"]
    for hook in list(_reload_hooks):
        try:
            done.append(hook())
        except certs.CertError as e:
            log.error("certificate reload: %s", e)
    return "; ".join(d for d in done if d)


#: Called by reload() after the gRPC credentials (e.g. the NBD export's TLS
#: context); each returns what it did, or raises CertError.
_reload_hooks: list[Callable[[], str]] = []


def add_reload_hook(hook: Callable[[], str]) -> None:
    """Run ``hook`` at every :func:`reload` (SIGHUP), after the gRPC credentials."""
    _reload_hooks.append(hook)


def remove_reload_hook(hook: Callable[[], str]) -> None:
    """Stop running ``hook`` (what it reloads has stopped); absent: nothing."""
    with contextlib.suppress(ValueError):
        _reload_hooks.remove(hook)


def _load_tls(sec: Security) -> certs.TlsFiles:
    assert sec.certs_dir is not None
    if sec.user:
        return certs.load_client_tls(sec.certs_dir, sec.user)
    return certs.load_node_tls(sec.certs_dir)


def _tls_enabled() -> Security | None:
    sec = security
    return sec if sec is not None and sec.certs_dir is not None and transport is None else None


def channel_credentials() -> grpc.ChannelCredentials | None:
    """The credentials every channel of this process presents (None: plaintext)."""
    global _channel_creds
    sec = _tls_enabled()
    if sec is None:
        return None
    with _lock:
        if _channel_creds is None:
            files = _load_tls(sec)
            _channel_creds = grpc.ssl_channel_credentials(
                root_certificates=files.ca_crt, private_key=files.key, certificate_chain=files.cert
            )
        return _channel_creds


def server_credentials() -> grpc.ServerCredentials | None:
    """Server credentials that require a client certificate signed by the
    CA, reloaded after :func:`reload` at the next handshake (None: plaintext)."""
    sec = _tls_enabled()
    if sec is None:
        return None
    # A server always presents the node certificate, whatever ``user`` is.
    node = Security(sec.certs_dir)
    files = _load_tls(node)

    def config(f: certs.TlsFiles) -> Any:
        return grpc.ssl_server_certificate_configuration([(f.key, f.cert)], root_certificates=f.ca_crt)

    applied = [_generation]

    def fetch() -> Any:
        # Called by gRPC on a handshake, from its own thread: cheap unless a
        # reload happened since the last new configuration.
        gen = _generation
        if gen == applied[0]:
            return None
        applied[0] = gen
        try:
            new = _load_tls(node)
        except certs.CertError as e:
            log.error("certificate reload refused, the server keeps its current certificate: %s", e)
            return None
        log.warning("server certificate reloaded: %s (CN %r)", new.cert_path, new.name)
        return config(new)

    return grpc.dynamic_ssl_server_credentials(config(files), fetch, require_client_authentication=True)


@dataclass(frozen=True)
class Peer:
    """Who called, from a handler's ``context``: ``tls`` False means plaintext
    (an --insecure process: everyone may do everything, as before TLS)."""

    tls: bool
    #: The certificate's CN: "node" for nodes and coordinators, else a user name.
    name: str = ""
    sans: tuple[str, ...] = ()
    address: str = ""

    @property
    def is_node(self) -> bool:
        return self.tls and self.name == certs.NODE_CN

    def describe(self) -> str:
        if not self.tls:
            return f"plaintext peer {self.address}"
        if self.is_node:
            return f"node certificate (SANs {', '.join(self.sans) or 'none'}) from {self.address}"
        return f"user {self.name!r} from {self.address}"


def peer_of(context: Any) -> Peer:
    """The caller of the RPC whose handler got ``context`` (grpc.aio)."""
    address = ""
    try:
        address = str(context.peer())
    except Exception:  # simulated contexts may not have one
        address = ""
    try:
        auth = context.auth_context() or {}
    except Exception:
        auth = {}
    name, sans = certs.peer_identity(auth)
    if not name:
        return Peer(False, address=address)
    return Peer(True, name, tuple(sans), address)


def host_of(address: str) -> str:
    """The host part of ``HOST:PORT`` (IPv6 brackets removed)."""
    host = address.rsplit(":", 1)[0] if ":" in address else address
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


# ---------------------------------------------------------------- the guard every server runs

#: A status message is cut to this many bytes AS SENT. It rides in the
#: HTTP/2 trailers, percent-encoded: every byte outside printable ASCII (and
#: "%") takes three, so 4,096 characters of "é" are 24 KiB on the wire. A
#: client refuses trailers over its metadata limit (gRPC's defaults: above
#: 8 KiB at random, above 16 KiB always) and reports RESOURCE_EXHAUSTED
#: "received metadata size exceeds ..." instead of the real code (found by
#: tests/test_fuzz_rpc.py: refusals echoing a 20,000-character volume name,
#: in ASCII and then in "é"). Bounded in bytes, not characters, for that.
MAX_STATUS_DETAILS_BYTES = 4096
#: The other trailers a handler sets (the coordinator's leader address, ...),
#: keys and values together: with the status message and gRPC's own trailers
#: the block stays under the 8 KiB soft limit. Entries past it are dropped,
#: with a warning, so that the status itself arrives.
MAX_TRAILING_METADATA_BYTES = 2048
#: Room kept for the "... (N more characters)" note of a cut message.
_CUT_NOTE_BYTES = 64


def _wire_bytes(ch: str) -> int:
    """How many bytes ``ch`` takes in a status message on the wire (gRPC's
    percent-encoding of grpc-message: printable ASCII but "%" stays as is)."""
    return 1 if " " <= ch <= "~" and ch != "%" else 3 * len(ch.encode("utf-8", "backslashreplace"))


def status_wire_bytes(text: str) -> int:
    """The size of ``text`` as a status message on the wire (percent-encoded)."""
    return sum(map(_wire_bytes, text))


def status_details(text: str) -> str:
    """``text`` cut to at most MAX_STATUS_DETAILS_BYTES as sent (see there),
    saying how much was cut. Characters UTF-8 cannot carry (lone surrogates,
    from an exception's text) are written as escapes: gRPC would fail to
    encode them."""
    text = str(text).encode("utf-8", "backslashreplace").decode("utf-8")
    size = keep = 0
    budget = MAX_STATUS_DETAILS_BYTES - _CUT_NOTE_BYTES
    for ch in text:
        size += _wire_bytes(ch)
        if size > MAX_STATUS_DETAILS_BYTES:
            return f"{text[:keep]}... ({len(text) - keep} more characters)"
        if size <= budget:
            keep += 1
    return text


def bounded_trailing_metadata(metadata: Any, where: str = "") -> tuple[tuple[str, Any], ...]:
    """``metadata`` (pairs) with the entries that do not fit in
    MAX_TRAILING_METADATA_BYTES left out, each named in one warning. An
    entry counts as gRPC counts it: key, value as sent (binary values in
    base64) and HPACK's 32 bytes of overhead (RFC 7541, 4.1)."""
    out: list[tuple[str, Any]] = []
    size = 0
    dropped: list[str] = []
    for key, value in tuple(metadata or ()):
        sent = (len(value) + 2) // 3 * 4 if isinstance(value, bytes | bytearray) else len(str(value))
        n = len(str(key)) + sent + 32
        if size + n > MAX_TRAILING_METADATA_BYTES:
            dropped.append(f"{key} ({n} bytes)")
            continue
        size += n
        out.append((key, value))
    if dropped:
        log.warning("%s: trailing metadata left out, past the %d-byte limit (the status is sent): %s",
                    where or "a call", MAX_TRAILING_METADATA_BYTES, ", ".join(dropped))
    return tuple(out)


class _Undecodable:
    """What the guard's deserializer yields for bytes that do not parse."""

    def __init__(self, type_name: str, error: Exception) -> None:
        self.type_name = type_name
        self.error = error

    def message(self) -> str:
        return f"the request is not a valid {self.type_name} message: {self.error}"


def _safe_deserializer(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None
    owner = getattr(deserialize, "__self__", None)
    type_name = getattr(owner, "DESCRIPTOR", None)
    name = type_name.full_name if type_name is not None else "request"

    def safe(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as e:  # DecodeError, or whatever a custom deserializer raises
            return _Undecodable(name, e)

    return safe


class _GuardedContext:
    """The handler's context, with every status message and the trailing
    metadata cut to size (MAX_STATUS_DETAILS_BYTES, MAX_TRAILING_METADATA_BYTES)."""

    def __init__(self, context: Any, method: str = "") -> None:
        self._context = context
        self._method = method

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> Any:
        return await self._context.abort(
            code, status_details(details), bounded_trailing_metadata(trailing_metadata, self._method)
        )

    async def abort_with_status(self, status: Any) -> Any:
        return await self.abort(status.code, status.details, status.trailing_metadata)

    def set_details(self, details: str) -> None:
        self._context.set_details(status_details(details))

    def set_trailing_metadata(self, trailing_metadata: Any) -> None:
        self._context.set_trailing_metadata(bounded_trailing_metadata(trailing_metadata, self._method))

    async def read(self) -> Any:
        # Handlers that read their stream with context.read() get the same
        # check as those that iterate it.
        req = await self._context.read()
        if isinstance(req, _Undecodable):
            raise _StreamUndecodable(req)
        return req


async def finish_behaviour(result: Any, context: Any) -> Any:
    """The result of a wrapped handler: an awaitable (coroutine handlers) or an
    async generator (streaming handlers that yield, whose items are written to
    the call), so that one wrapper serves both kinds."""
    if inspect.isasyncgen(result):
        async for item in result:
            await context.write(item)
        return None
    if inspect.isawaitable(result):
        return await result
    return result


Behaviour = Callable[..., Any]


def wrap_handler(
    handler: grpc.RpcMethodHandler,
    wrap_unary: Callable[[Behaviour], Behaviour],
    wrap_stream: Callable[[Behaviour], Behaviour] | None = None,
    *,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """``handler`` rebuilt with its behaviour wrapped, whichever of the four
    kinds it is (the one place that knows them: the interceptors here and in
    syncrep/authz.py only say how to wrap). ``wrap_unary`` wraps a behaviour
    that gets one request (unary_unary, unary_stream), ``wrap_stream`` (by
    default the same) one that gets the request iterator (stream_unary,
    stream_stream); ``request_deserializer`` replaces the handler's. A
    wrapper's result may return an awaitable or an async generator
    (:func:`finish_behaviour`). The response serializer is kept."""
    stream = wrap_stream or wrap_unary
    deser = request_deserializer if request_deserializer is not None else handler.request_deserializer
    ser = handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(wrap_unary(handler.unary_unary), deser, ser)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(wrap_unary(handler.unary_stream), deser, ser)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(stream(handler.stream_unary), deser, ser)
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(stream(handler.stream_stream), deser, ser)
    return handler


#: What a handler raises that gRPC itself turns into the status: an abort
#: (its status is set already), a usage error of the context, a cancellation.
_GRPC_OWN = (aio.AbortError, aio.UsageError, asyncio.CancelledError)
#: What sending the status raises when the call is already over (the client
#: cancelled or its deadline passed while the handler ran): nothing can be
#: sent any more. Answering it as "unexpected" aborted a second time, and
#: grpc.aio logged the "Abort already called!" traceback (a coordinator cut
#: from etcd, its redirects outlived by their callers: test_etcd_partition).
_CALL_GONE: tuple[type[BaseException], ...] = tuple(
    t for t in (getattr(getattr(getattr(grpc, "_cython", None), "cygrpc", None), "ExecuteBatchError", None),)
    if isinstance(t, type)
)


def _call_gone(method: str, e: BaseException) -> BaseException:
    log.debug("%s: the call ended before its status could be sent (%s)", method, e)
    return asyncio.CancelledError(f"{method}: the call ended before its status could be sent")


async def _unexpected(method: str, ctx: _GuardedContext, e: Exception) -> None:
    """A handler raised an exception it did not turn into a status (a bug):
    what grpc.aio answers (the code set, else UNKNOWN; "Unexpected <class>:
    text"), with the text bounded -- grpc.aio's own answer carries the whole
    text, which may quote the request, and a long one lost the status to the
    metadata limit -- and the traceback logged once, here."""
    code = grpc.StatusCode.UNKNOWN
    with contextlib.suppress(Exception):
        set_code = ctx._context.code()
        if isinstance(set_code, grpc.StatusCode) and set_code != grpc.StatusCode.OK:
            code = set_code
    log.error("%s: unexpected %s raised by the handler, answered %s", method, type(e).__name__, code.name,
              exc_info=e)
    await ctx.abort(code, f"Unexpected {type(e)}: {e}")


class Guard(aio.ServerInterceptor):
    """The outermost interceptor of every :class:`Server`: a request whose
    bytes do not parse gets INVALID_ARGUMENT naming the message type (not
    UNKNOWN with a traceback in the log; found by tests/test_fuzz_rpc.py), a
    message that does not parse on a request stream ends the call with
    INVALID_ARGUMENT, and every status -- an abort, set_details, the trailing
    metadata, or an exception a handler let out -- arrives with its code and
    a message within MAX_STATUS_DETAILS_BYTES on the wire."""

    async def intercept_service(self, continuation: Callable[[Any], Any], handler_call_details: Any) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = str(getattr(handler_call_details, "method", ""))

        def unary_request(behaviour: Behaviour) -> Behaviour:
            async def wrapped(request: Any, context: Any) -> Any:
                ctx = _GuardedContext(context, method)
                if isinstance(request, _Undecodable):
                    log.warning("%s: refused an undecodable request from %s: %s", method, _peer(context),
                                request.error)
                    await ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message())
                try:
                    return await finish_behaviour(behaviour(request, ctx), ctx)
                except _GRPC_OWN:
                    raise
                except _CALL_GONE as e:
                    raise _call_gone(method, e) from None
                except Exception as e:
                    await _unexpected(method, ctx, e)

            return wrapped

        def stream_request(behaviour: Behaviour) -> Behaviour:
            async def wrapped(request_iterator: Any, context: Any) -> Any:
                ctx = _GuardedContext(context, method)

                async def checked() -> Any:
                    async for req in request_iterator:
                        if isinstance(req, _Undecodable):
                            raise _StreamUndecodable(req)
                        yield req

                try:
                    return await finish_behaviour(behaviour(checked(), ctx), ctx)
                except _StreamUndecodable as e:
                    log.warning("%s: a message from %s did not parse: %s", method, _peer(context), e.bad.error)
                    await ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, e.bad.message() + " (on the request stream)")
                except _GRPC_OWN:
                    raise
                except _CALL_GONE as e:
                    raise _call_gone(method, e) from None
                except Exception as e:
                    await _unexpected(method, ctx, e)

            return wrapped

        return wrap_handler(handler, unary_request, stream_request,
                            request_deserializer=_safe_deserializer(handler.request_deserializer))


class _StreamUndecodable(Exception):
    def __init__(self, bad: _Undecodable) -> None:
        super().__init__(bad.message())
        self.bad = bad


def _peer(context: Any) -> str:
    try:
        return str(context.peer())
    except Exception:
        return "?"


class Server:
    """A grpc.aio server with health checking and reflection.

    ``add`` registers servicers (``add(pb2_grpc.add_FooServicer_to_server, impl)``),
    ``start`` binds and starts, ``stop`` is graceful: in-flight RPCs get
    ``grace_s`` seconds to finish.
    """

    def __init__(self, listen: str, interceptors: Sequence[Any] = ()) -> None:
        self.listen = listen
        self.server = (
            aio.server(options=_SERVER_OPTIONS, interceptors=[Guard(), *interceptors])
            if transport is None
            else transport.server(listen, interceptors)
        )
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._services: list[str] = [health.SERVICE_NAME, reflection.SERVICE_NAME]
        self.port = 0

    def add(self, adder: Callable[[Any, Any], None], servicer: Any, *service_names: str) -> None:
        adder(servicer, self.server)
        self._services.extend(service_names)

    async def start(self) -> int:
        reflection.enable_server_reflection(self._services, self.server)
        creds = server_credentials() if transport is None else None
        try:
            if creds is None:
                self.port = self.server.add_insecure_port(self.listen)
            else:
                self.port = self.server.add_secure_port(self.listen, creds)
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
    """A grpc.aio channel to ``address`` with our limits and keepalives: mutual
    TLS (the server's SAN checked against ``address``) once :func:`configure`
    was given a certs dir, else plaintext."""
    if transport is not None:
        return transport.channel(address)
    creds = channel_credentials()
    if creds is None:
        return aio.insecure_channel(address, options=_COMMON_OPTIONS)
    return aio.secure_channel(address, creds, options=_COMMON_OPTIONS)


def sync_channel(address: str) -> grpc.Channel:
    """A blocking channel, for CLI tools that do not run an event loop."""
    creds = channel_credentials()
    if creds is None:
        return grpc.insecure_channel(address, options=_COMMON_OPTIONS)
    return grpc.secure_channel(address, creds, options=_COMMON_OPTIONS)


async def wait_for_signal(signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT)) -> int:
    """Block until one of ``signals`` arrives; return its number. Meanwhile
    SIGHUP reloads the certificates (:func:`reload`): new connections use the
    new files, the ones in flight (and their writes) are not touched."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[int] = loop.create_future()
    def fire(s: int) -> None:
        if not fut.done():
            fut.set_result(s)

    def hup() -> None:
        sdnotify.reloading()
        try:
            log.warning("SIGHUP: %s", reload())
        except certs.CertError as e:
            log.error("SIGHUP: certificates NOT reloaded, the current ones stay in use: %s", e)
        finally:
            sdnotify.ready("certificates reloaded")

    def on_signal(s: int, _frame: object) -> None:
        # Why not loop.add_signal_handler: it learns of a signal only from the
        # byte the C handler writes to the loop's self-pipe, and that write is
        # dropped when the pipe is full -- which 1000 volumes' I/O threads
        # waking the loop at once did (a node ignored its SIGTERM until
        # SIGKILL: bench_coordinator_scale, "Exception ignored when trying to
        # write to the signal wakeup fd: BlockingIOError"). A Python-level
        # handler runs in the main thread at the next bytecode whatever the
        # pipe holds (a blocked epoll_wait is interrupted, EINTR, PEP 475).
        if s == signal.SIGHUP:
            loop.call_soon_threadsafe(hup)
        else:
            loop.call_soon_threadsafe(fire, s)

    signals = [s for s in signals if s != signal.SIGHUP]
    previous = {sig: signal.signal(sig, on_signal) for sig in [*signals, signal.SIGHUP]}
    try:
        return await fut
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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
