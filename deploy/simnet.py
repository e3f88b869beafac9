"""An in-memory gRPC network with fault hooks, for the deterministic simulator.

It implements the small part of ``grpc.aio`` that syncrep uses (the generated
stubs' four call kinds on a channel; ``add_registered_method_handlers`` /
``add_generic_rpc_handlers`` on a server; ``read``/``write``/``abort`` on a
servicer context), so the REAL servicers and clients run unchanged over it:
``syncrep.rpc.transport = SimNet(...)`` is the only switch (see
``syncrep/rpc.py``). Messages are serialised and parsed with the generated
code on the way, exactly as on the wire, so nothing is shared by reference.

Which host a piece of code runs on is a context variable (``current_host``),
inherited by every task it creates; the simulator sets it when it starts a
host. That lets the network tell who is calling, and lets a crash find every
task of the crashed host.

Fault model (what a real network does, which the tests of the multi-process
nemesis also inject):

Trailing metadata set by a handler (``context.abort(..., trailing_metadata=)``,
``set_trailing_metadata``) travels with the status, as gRPC's does: a
follower coordinator's redirect names the leader in it (issue 12).

* **crash** (``crash(host)``): the host's server is gone; its open streams
  break with UNAVAILABLE at once (the kernel resets the connections) and new
  calls to it fail with UNAVAILABLE (connection refused).
* **corruption in transit** (``tamper``): a hook may replace any message a
  client streams, e.g. flip a byte of a resync chunk while its checksum says
  what was sent, as a bad NIC or memory would.
* **partition** (``cut(a, b)``, one-way; ``cut_both``): messages from a to b
  are held, not lost, as TCP holds them; they arrive in order when the cut
  heals (``heal``). A connection whose path stays cut for ``KEEPALIVE_DEAD_S``
  breaks with UNAVAILABLE, as gRPC keepalives declare it dead. A unary call
  without a deadline fails the same way.

**Mutual TLS identities** (``SimNet(identities=...)``, ``python -m deploy.sim
--tls``): no bytes are encrypted, but every call carries the calling host's
certificate identity, as gRPC's ``auth_context()`` gives it on a mutual-TLS
server (real certificates, made by ``syncrep.certs`` for the run: a node
certificate per node and coordinator host naming that host, the admin's
client certificate for everything else), and a server runs the
authorization of ``syncrep.authz.Interceptor`` it was built with before the
handler. So the real authorization table and the per-stream checks (a
Replicate stream only from the volume's primary) run under every fault.

Delivery takes ``latency_s`` plus a seeded jitter, in order per direction of a
call (a stream is one TCP connection). Everything runs on the event loop; no
threads, no real time.
"""

from __future__ import annotations

import asyncio
import contextvars
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc import aio

from syncrep import authz, rpc

__all__ = ["KEEPALIVE_DEAD_S", "SimNet", "current_host"]

#: keepalive_time + keepalive_timeout of syncrep/rpc.py: a silent connection is dead after this.
KEEPALIVE_DEAD_S = rpc.KEEPALIVE_TIME_S + rpc.KEEPALIVE_TIMEOUT_S

current_host: contextvars.ContextVar[str] = contextvars.ContextVar("sim_host", default="client")

_EOF = aio.EOF


def _rpc_error(code: grpc.StatusCode, details: str, trailing: Any = ()) -> aio.AioRpcError:
    return aio.AioRpcError(code, aio.Metadata(), aio.Metadata(*trailing), details=details)


class _Abort(Exception):
    """Raised by ``context.abort`` inside a handler, as grpc.aio does."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: Any = ()) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.trailing = tuple(trailing or ())


@dataclass
class _Pipe:
    """One direction of one call: ordered, delayed, held while the path is cut."""

    net: SimNet
    src: str
    dst: str
    sink: Callable[[Any], None]
    held: list[Any] = field(default_factory=list)
    last_due: float = 0.0
    closed: bool = False

    def send(self, item: Any) -> None:
        if self.closed:
            return
        if self.net.is_cut(self.src, self.dst) or self.held:
            self.held.append(item)
            return
        self._deliver(item)

    def _deliver(self, item: Any) -> None:
        loop = asyncio.get_running_loop()
        # Strictly after the previous message of this direction: timers with
        # equal deadlines may run in any order, and a stream is FIFO.
        due = max(self.last_due + 1e-7, loop.time() + self.net.delay())
        self.last_due = due
        loop.call_at(due, self._arrive, item)

    def _arrive(self, item: Any) -> None:
        if not self.closed:
            self.sink(item)

    def flush(self) -> None:
        if self.closed or self.net.is_cut(self.src, self.dst):
            return
        held, self.held = self.held, []
        for item in held:
            self._deliver(item)


class _Call:
    """Both ends of one RPC: the client's call object and the server's context."""

    def __init__(self, net: SimNet, src: str, dst: str, method: str, handler: Any,
                 req_ser: Callable[[Any], bytes], resp_de: Callable[[bytes], Any],
                 timeout: float | None) -> None:
        self.net = net
        self.src, self.dst, self.method = src, dst, method
        self.handler = handler
        self.req_ser, self.resp_de = req_ser, resp_de
        self.to_server: asyncio.Queue[Any] = asyncio.Queue()
        self.to_client: asyncio.Queue[Any] = asyncio.Queue()
        self.up = _Pipe(net, src, dst, self.to_server.put_nowait)
        self.down = _Pipe(net, dst, src, self._client_arrival)
        self.status: tuple[grpc.StatusCode, str] | None = None  # as the client sees it
        # Trailing metadata (a coordinator's redirect names the leader in it, issue 12):
        # set by the handler, carried with the status.
        self.trailing: tuple[tuple[str, str], ...] = ()
        self.trailing_seen: tuple[tuple[str, str], ...] = ()  # as the client received it
        self.finished = asyncio.get_running_loop().create_future()  # client-side completion
        self.server_task: asyncio.Task[Any] | None = None
        self.server: SimServer | None = None
        self.started = False
        self.deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        self.server_done = False

    # ------------------------------------------------------------- server side
    def start_server(self) -> None:
        """The request (or the stream's opening) reached the server host."""
        if self.started or self.finished.done():
            return
        self.started = True
        server = self.net.server_for(self.dst)
        if server is None:
            self._fail_client(grpc.StatusCode.UNAVAILABLE, f"sim: no server at {self.dst}")
            return
        ctx = contextvars.copy_context()
        ctx.run(current_host.set, server.host)
        self.server = server
        self.server_task = asyncio.get_running_loop().create_task(self._serve(), context=ctx)
        server.calls[self] = None
        self.net.calls[self] = None

    async def _serve(self) -> None:
        h = self.handler
        context = _Context(self)
        try:
            if self.net.identities is not None and self.server is not None:
                # What the server's authz.Interceptor does before the handler
                # (a refusal aborts: _Abort, below).
                for icp in self.server.interceptors:
                    if isinstance(icp, authz.Interceptor) and not await authz.check_call(
                            icp.policy, self.method, context):
                        return
            if h.request_streaming:
                request: Any = _RequestIterator(self)
            else:
                raw = await self.to_server.get()
                request = h.request_deserializer(raw) if h.request_deserializer else raw
            if h.response_streaming:
                fn = h.unary_stream if not h.request_streaming else h.stream_stream
                result = fn(request, context)
                if hasattr(result, "__aiter__"):
                    async for r in result:
                        await context.write(r)
                else:
                    await result
            else:
                fn = h.unary_unary if not h.request_streaming else h.stream_unary
                r = await fn(request, context)
                self.down.send(("msg", h.response_serializer(r)))
            self.down.send(("status", grpc.StatusCode.OK, "", self.trailing))
        except _Abort as e:
            self.down.send(("status", e.code, e.details, e.trailing))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.down.send(("status", grpc.StatusCode.UNKNOWN, f"Unexpected {type(e).__name__}: {e}", ()))
        finally:
            self.server_done = True

    # ------------------------------------------------------------- client side
    def _client_arrival(self, item: Any) -> None:
        if self.finished.done():
            return
        if item[0] == "msg":
            self.to_client.put_nowait(self.resp_de(item[1]))
        else:
            self.trailing_seen = item[3]
            self._finish(item[1], item[2])

    def _finish(self, code: grpc.StatusCode, details: str) -> None:
        if self.finished.done():
            return
        self.status = (code, details)
        self.finished.set_result(None)
        self.to_client.put_nowait(_EOF)
        self._close()

    def _fail_client(self, code: grpc.StatusCode, details: str) -> None:
        """The connection broke: the client sees ``code``; the handler is cancelled."""
        self._finish(code, details)
        if self.server_task is not None and not self.server_task.done():
            self.server_task.cancel()

    def _close(self) -> None:
        self.up.closed = self.down.closed = True
        self.net.calls.pop(self, None)
        server = self.net.server_for(self.dst)
        if server is not None:
            server.calls.pop(self, None)

    def client_cancel(self) -> None:
        if self.finished.done():
            return
        self._finish(grpc.StatusCode.CANCELLED, "Locally cancelled by application!")
        if self.server_task is not None and not self.server_task.done():
            self.server_task.cancel()

    def raise_status(self) -> None:
        assert self.status is not None
        code, details = self.status
        if code is grpc.StatusCode.CANCELLED:
            raise asyncio.CancelledError()
        if code is not grpc.StatusCode.OK:
            raise _rpc_error(code, details, self.trailing_seen)

    async def wait_deadline(self, aw: Any) -> Any:
        if self.deadline is None:
            return await aw
        remaining = self.deadline - asyncio.get_running_loop().time()
        try:
            return await asyncio.wait_for(aw, max(0.0, remaining))
        except TimeoutError:
            self._fail_client(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
            self.raise_status()


class _RequestIterator:
    def __init__(self, call: _Call) -> None:
        self.call = call

    def __aiter__(self) -> _RequestIterator:
        return self

    async def __anext__(self) -> Any:
        item = await _Context(self.call).read()
        if item is _EOF:
            raise StopAsyncIteration
        return item


class _Context:
    """The servicer context (the parts syncrep uses)."""

    def __init__(self, call: _Call) -> None:
        self.call = call

    async def read(self) -> Any:
        raw = await self.call.to_server.get()
        if raw is _EOF:
            self.call.to_server.put_nowait(_EOF)  # stays at EOF
            return _EOF
        de = self.call.handler.request_deserializer
        return de(raw) if de else raw

    async def write(self, message: Any) -> None:
        data = self.call.handler.response_serializer(message)
        if len(data) > rpc.MAX_MESSAGE_BYTES:
            raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "sim: response larger than the message limit")
        self.call.down.send(("msg", data))
        await asyncio.sleep(0)

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = None) -> None:
        # As grpc.aio: an abort without metadata sends what the handler set.
        raise _Abort(code, details, trailing_metadata or self.call.trailing)

    def set_trailing_metadata(self, trailing_metadata: Any) -> None:
        self.call.trailing = tuple(trailing_metadata or ())

    def auth_context(self) -> dict[str, list[bytes]]:
        """The caller's verified certificate, as gRPC's mutual TLS gives it
        (empty without identities: a plaintext server)."""
        ids = self.call.net.identities
        return ids(self.call.src) if ids is not None else {}

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.call.trailing

    def peer(self) -> str:
        return f"sim:{self.call.src}"

    def invocation_metadata(self) -> tuple[Any, ...]:
        return ()

    def cancelled(self) -> bool:
        return self.call.finished.done()

    def done(self) -> bool:
        return self.call.server_done

    def time_remaining(self) -> float | None:
        if self.call.deadline is None:
            return None
        return max(0.0, self.call.deadline - asyncio.get_running_loop().time())

    def set_code(self, code: grpc.StatusCode) -> None:
        pass

    def set_details(self, details: str) -> None:
        pass


class _ClientCall:
    """What a stub call returns: awaitable for a unary response, read/write for streams."""

    def __init__(self, call: _Call, request: Any, request_streaming: bool, response_streaming: bool) -> None:
        self._c = call
        self._response_streaming = response_streaming
        self._request_streaming = request_streaming
        if not request_streaming:
            data = call.req_ser(request)
            if len(data) > rpc.MAX_MESSAGE_BYTES:
                call._finish(grpc.StatusCode.RESOURCE_EXHAUSTED, "sim: request larger than the message limit")
                return
            call.up.send(data)
            call.up.send(_EOF)
        call.net.open(call)

    # unary response
    def __await__(self) -> Any:
        return self._unary().__await__()

    async def _unary(self) -> Any:
        c = self._c
        r = await c.wait_deadline(c.to_client.get())
        if r is _EOF:
            c.raise_status()
            raise _rpc_error(grpc.StatusCode.INTERNAL, "sim: no response message")
        await c.wait_deadline(c.finished)
        c.raise_status()
        return r

    async def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        """The trailing metadata the handler set (carried with the status; a
        follower's redirect names the leader in it); empty until the call ended."""
        return self._c.trailing_seen

    # streaming
    async def write(self, message: Any) -> None:
        c = self._c
        if c.finished.done():
            raise asyncio.InvalidStateError("RPC already finished.")
        if c.net.tamper is not None:
            message = c.net.tamper(c.src, c.dst, c.method, message)
        data = c.req_ser(message)
        if len(data) > rpc.MAX_MESSAGE_BYTES:
            c._fail_client(grpc.StatusCode.RESOURCE_EXHAUSTED, "sim: request larger than the message limit")
            c.raise_status()
        c.up.send(data)
        await asyncio.sleep(0)

    async def done_writing(self) -> None:
        if not self._c.finished.done():
            self._c.up.send(_EOF)

    async def read(self) -> Any:
        c = self._c
        r = await c.wait_deadline(c.to_client.get())
        if r is _EOF:
            c.to_client.put_nowait(_EOF)
            c.raise_status()
            return _EOF
        return r

    def __aiter__(self) -> Any:
        return self._iter()

    async def _iter(self) -> Any:
        while True:
            r = await self.read()
            if r is _EOF:
                return
            yield r

    def cancel(self) -> bool:
        was = not self._c.finished.done()
        self._c.client_cancel()
        return was

    def done(self) -> bool:
        return self._c.finished.done()

    async def code(self) -> grpc.StatusCode:
        await self._c.finished
        assert self._c.status is not None
        return self._c.status[0]

    async def details(self) -> str:
        await self._c.finished
        assert self._c.status is not None
        return self._c.status[1]


class _MultiCallable:
    def __init__(self, channel: _Channel, method: str, req_ser: Any, resp_de: Any,
                 request_streaming: bool, response_streaming: bool) -> None:
        self.channel = channel
        self.method = method
        self.req_ser = req_ser or (lambda x: x)
        self.resp_de = resp_de or (lambda x: x)
        self.request_streaming = request_streaming
        self.response_streaming = response_streaming

    def __call__(self, request: Any = None, *, timeout: float | None = None, **_: Any) -> _ClientCall:
        net = self.channel.net
        if self.channel.closed:
            raise aio.UsageError("Channel is closed.")
        handler = net.handler_for(self.channel.address, self.method)
        call = _Call(net, current_host.get(), self.channel.address, self.method, handler,
                     self.req_ser, self.resp_de, timeout)
        cc = _ClientCall(call, request, self.request_streaming, self.response_streaming)
        self.channel.calls[call] = None
        return cc


class _Channel:
    def __init__(self, net: SimNet, address: str) -> None:
        self.net = net
        self.address = address
        self.closed = False
        self.calls: dict[_Call, None] = {}

    def unary_unary(self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
                    **_: Any) -> _MultiCallable:
        return _MultiCallable(self, method, request_serializer, response_deserializer, False, False)

    def unary_stream(self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
                     **_: Any) -> _MultiCallable:
        return _MultiCallable(self, method, request_serializer, response_deserializer, False, True)

    def stream_unary(self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
                     **_: Any) -> _MultiCallable:
        return _MultiCallable(self, method, request_serializer, response_deserializer, True, False)

    def stream_stream(self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
                      **_: Any) -> _MultiCallable:
        return _MultiCallable(self, method, request_serializer, response_deserializer, True, True)

    async def close(self, grace: float | None = None) -> None:
        self.closed = True
        for call in list(self.calls):
            call.client_cancel()
        self.calls.clear()

    async def __aenter__(self) -> _Channel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class _Handler:
    """A method nobody serves: UNIMPLEMENTED, as grpc answers."""

    request_streaming = False
    response_streaming = False
    request_deserializer = None
    response_serializer = None

    async def unary_unary(self, request: Any, context: _Context) -> Any:
        raise _Abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")


class _HandlerCallDetails:
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


class SimServer:
    def __init__(self, net: SimNet, listen: str, interceptors: Any = ()) -> None:
        self.net = net
        self.listen = listen
        self.interceptors = tuple(interceptors)
        self.host = current_host.get()
        self.address = ""
        self.methods: dict[str, Any] = {}
        self.generic: list[Any] = []
        self.calls: dict[_Call, None] = {}
        self.running = False

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        for name, h in handlers.items():
            self.methods[f"/{service}/{name}"] = h

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.generic.extend(handlers)

    def add_insecure_port(self, address: str) -> int:
        host, _, port_s = address.rpartition(":")
        port = int(port_s) or self.net.next_port()
        self.address = f"{host}:{port}"
        self.net.bind(self)
        return port

    async def start(self) -> None:
        self.running = True

    async def stop(self, grace: float | None) -> None:
        """Graceful: no new calls; in-flight handlers get ``grace`` seconds."""
        self.running = False
        pending = [c.server_task for c in self.calls if c.server_task is not None and not c.server_task.done()]
        if pending and grace:
            await asyncio.wait(pending, timeout=grace)
        for c in list(self.calls):
            c._fail_client(grpc.StatusCode.UNAVAILABLE, "sim: server stopped")
        self.net.unbind(self)

    def handler(self, method: str) -> Any:
        h = self.methods.get(method)
        if h is not None:
            return h
        for g in self.generic:
            h = g.service(_HandlerCallDetails(method))
            if h is not None:
                return h
        return _Handler()


class SimNet:
    """The network: servers by address, hosts by name, the cuts between hosts."""

    def __init__(self, rng: random.Random, latency_s: float = 0.0002, jitter_s: float = 0.0003,
                 identities: Callable[[str], dict[str, list[bytes]]] | None = None) -> None:
        self.rng = rng
        # host -> its auth_context() as a mutual-TLS server sees it; None: plaintext.
        self.identities = identities
        self.latency_s = latency_s
        self.jitter_s = jitter_s
        self.servers: dict[str, SimServer] = {}
        self.host_of: dict[str, str] = {}  # address -> host
        # (from host, to host) -> how many faults cut that path now; overlapping
        # faults on one path each heal only their own cut.
        self.cuts: dict[tuple[str, str], int] = {}
        self._cut_gen: dict[tuple[str, str], int] = {}  # bumped each time a path becomes cut
        self.calls: dict[_Call, None] = {}
        self._port = 40000
        self._gen = 0
        #: Fault hook: sees every message a client streams (src host, dst
        #: address, method, message) and returns what travels instead.
        self.tamper: Callable[[str, str, str, Any], Any] | None = None

    # -- rpc.Transport
    def server(self, listen: str, interceptors: Any = ()) -> SimServer:
        return SimServer(self, listen, interceptors)

    def channel(self, address: str) -> _Channel:
        return _Channel(self, address)

    # -- plumbing
    def next_port(self) -> int:
        self._port += 1
        return self._port

    def bind(self, server: SimServer) -> None:
        self.servers[server.address] = server
        self.host_of[server.address] = server.host

    def unbind(self, server: SimServer) -> None:
        if self.servers.get(server.address) is server:
            del self.servers[server.address]

    def server_for(self, address: str) -> SimServer | None:
        s = self.servers.get(address)
        return s if s is not None and s.running else None

    def handler_for(self, address: str, method: str) -> Any:
        s = self.servers.get(address)
        return s.handler(method) if s is not None else _Handler()

    def delay(self) -> float:
        return self.latency_s + self.rng.random() * self.jitter_s

    def host(self, address: str) -> str:
        return self.host_of.get(address, address)

    def is_cut(self, src: str, dst: str) -> bool:
        return (self.host(src), self.host(dst)) in self.cuts

    def open(self, call: _Call) -> None:
        """A call begins: connect (refused at once if nobody listens), then the
        opening travels like any message."""
        if self.server_for(call.dst) is None:
            call._finish(grpc.StatusCode.UNAVAILABLE, f"sim: connection to {call.dst} refused")
            return
        self.calls[call] = None
        if self.is_cut(call.src, call.dst):
            # The opening is held with the first message; it starts the handler
            # on heal, or keepalive declares the connection dead first (a
            # unary call without a deadline ends that way too).
            self._watch(call.src, call.dst)
            call.up.held.insert(0, _Start())
            call.up.sink = _starting_sink(call)
        else:
            asyncio.get_running_loop().call_later(self.delay(), call.start_server)

    # -- faults
    def cut(self, a: str, b: str) -> None:
        """Hold every message from host a to host b (one way), until ``heal(a, b)``."""
        n = self.cuts.get((a, b), 0)
        self.cuts[(a, b)] = n + 1
        if n == 0:
            self._gen += 1
            self._cut_gen[(a, b)] = self._gen
            self._watch(a, b)

    def heal(self, a: str, b: str) -> None:
        n = self.cuts.get((a, b), 0)
        if n == 0:
            return
        if n > 1:
            self.cuts[(a, b)] = n - 1
            return
        del self.cuts[(a, b)]
        self._cut_gen.pop((a, b), None)
        for call in list(self.calls):
            for pipe in (call.up, call.down):
                if (self.host(pipe.src), self.host(pipe.dst)) == (a, b):
                    pipe.flush()

    def _watch(self, a: str, b: str) -> None:
        gen = self._cut_gen.get((a, b))
        asyncio.get_running_loop().call_later(KEEPALIVE_DEAD_S, self._keepalive_check, a, b, gen)

    def _keepalive_check(self, a: str, b: str, gen: int | None) -> None:
        if gen is None or self._cut_gen.get((a, b)) != gen:
            return
        for call in list(self.calls):
            hosts = {(self.host(call.src), self.host(call.dst)), (self.host(call.dst), self.host(call.src))}
            if (a, b) in hosts:
                call._fail_client(grpc.StatusCode.UNAVAILABLE, "sim: keepalive watchdog timeout (path cut)")

    def crash(self, host: str) -> None:
        """The host's process is gone: its listening servers vanish and every
        connection to or from it is reset."""
        for addr, s in list(self.servers.items()):
            if s.host == host:
                s.running = False
                del self.servers[addr]
        for call in list(self.calls):
            if self.host(call.src) == host or self.host(call.dst) == host:
                call._fail_client(grpc.StatusCode.UNAVAILABLE, f"sim: connection reset ({host} crashed)")


class _Start:
    pass


def _starting_sink(call: _Call) -> Callable[[Any], None]:
    def sink(item: Any) -> None:
        if isinstance(item, _Start):
            call.start_server()
        else:
            call.to_server.put_nowait(item)
    return sink
