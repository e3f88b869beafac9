"""Hypothesis strategies built from the protobuf descriptors, for tests/test_fuzz_rpc.py.

Why from the descriptors: a new RPC or a new field is fuzzed the day it is
added to protos/syncrep.proto, without anyone writing a strategy for it.

* ``message_strategy(desc, hints)``: messages of type ``desc`` with random
  field values, recursively: integers at their edges (0, 2**63-1, 2**64-1, the
  negative ones where signed), floats incl. NaN and infinities, strings incl.
  '' and 64 KiB and non-ASCII, bytes up to a few MiB (prebuilt, so hypothesis
  does not generate megabytes byte by byte), enums with unknown values,
  repeated fields with 10**4 entries, oneofs with one member or none.
  ``hints`` maps a field name (and kind) to values that matter on a live cluster
  (the real volume, the real addresses, the current epoch, ...): for those
  fields hypothesis draws from the hints about half of the time.
* ``mutated_bytes(msg_strategy)``: random bytes as a serialized message, either
  raw noise or a real message's serialization truncated, with a byte flipped
  or with junk appended (bytes that almost parse reach deeper).
* ``LoopThread``: an asyncio loop on a thread of its own. Hypothesis drives
  plain functions; every gRPC call runs on this loop with a bounded wait, so
  a server that never answers fails the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import threading
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

from conftest import random_bytes
from google.protobuf import descriptor as _d
from google.protobuf import message_factory
from google.protobuf.message import Message
from hypothesis import strategies as st

T = TypeVar("T")

KiB = 1024
MiB = 1024 * KiB
#: Repeated fields get this many entries in their "huge count" variant.
HUGE_COUNT = 10_000
#: Nesting depth of generated messages (the proto has no cycles; this only bounds the size).
MAX_DEPTH = 3

_FD = _d.FieldDescriptor

U64_EDGES = [0, 1, 2, 4095, 4096, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1]
I64_EDGES = [0, 1, -1, 2**31 - 1, -(2**31), 2**63 - 1, -(2**63)]
FLOAT_EDGES = [0.0, -0.0, 1.0, -1.0, 0.001, 60.0, 60.000001, 1e308, -1e308, 5e-324,
               math.inf, -math.inf, math.nan]
#: Unknown values of every enum (proto3 enums are open: they arrive as plain ints).
ENUM_UNKNOWN = [-1, 6, 99, 2**31 - 1, -(2**31)]

STRING_EDGES = [
    "", " ", "\x00", "x" * 64 * KiB, "é" * 20_000, "日本語のボリューム", "\U0001f4a3" * 100,
    "../../../../etc/passwd", "..", ".", "/", "\\", "%s%n", "a" * 64, "a" * 65, "\ud7ff\ue000",
]


def _blob(n: int, tag: str) -> bytes:
    return random_bytes(n, f"fuzz-blob-{tag}-{n}")


#: Prebuilt byte values: empty, one byte, block-sized, the largest write (4 MiB),
#: one block more, and more than the gRPC message limit (refused by gRPC itself).
BYTES_EDGES = [
    b"", b"\x00", _blob(4095, "a"), _blob(4096, "a"), b"\x00" * 4096, _blob(64 * KiB, "a"),
    _blob(4 * MiB, "a"), _blob(4 * MiB + 4096, "a"), _blob(5 * MiB, "a"),
]


def _uint(bits: int) -> st.SearchStrategy[int]:
    top = 2**bits - 1
    return st.one_of(st.sampled_from([e for e in U64_EDGES if e <= top]), st.integers(0, top))


def _sint(bits: int) -> st.SearchStrategy[int]:
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return st.one_of(st.sampled_from([e for e in I64_EDGES if lo <= e <= hi]), st.integers(lo, hi))


def scalar_strategy(f: _d.FieldDescriptor, *, small: bool = False) -> st.SearchStrategy[Any]:
    """Values of one (non-message) field. ``small``: no multi-KiB values (for the
    entries of a huge repeated field)."""
    t = f.type
    if t in (_FD.TYPE_UINT64, _FD.TYPE_FIXED64):
        return _uint(64)
    if t in (_FD.TYPE_UINT32, _FD.TYPE_FIXED32):
        return _uint(32)
    if t in (_FD.TYPE_INT64, _FD.TYPE_SINT64, _FD.TYPE_SFIXED64):
        return _sint(64)
    if t in (_FD.TYPE_INT32, _FD.TYPE_SINT32, _FD.TYPE_SFIXED32):
        return _sint(32)
    if t == _FD.TYPE_BOOL:
        return st.booleans()
    if t == _FD.TYPE_DOUBLE:
        return st.one_of(st.sampled_from(FLOAT_EDGES), st.floats())
    if t == _FD.TYPE_FLOAT:
        return st.one_of(st.sampled_from(FLOAT_EDGES[:6] + FLOAT_EDGES[-3:]), st.floats(width=32))
    if t == _FD.TYPE_STRING:
        text = st.text(st.characters(codec="utf-8"), max_size=40)
        return text if small else st.one_of(text, st.sampled_from(STRING_EDGES))
    if t == _FD.TYPE_BYTES:
        raw = st.binary(max_size=64)
        return raw if small else st.one_of(raw, st.sampled_from(BYTES_EDGES))
    if t == _FD.TYPE_ENUM:
        assert f.enum_type is not None
        known = [v.number for v in f.enum_type.values]
        return st.sampled_from(known + ENUM_UNKNOWN)
    raise TypeError(f"no strategy for field {f.full_name} of type {t}")


def message_class(desc: _d.Descriptor) -> type[Message]:
    return message_factory.GetMessageClass(desc)


def build_message(desc: _d.Descriptor, values: Mapping[str, Any]) -> Message:
    """A message of type ``desc`` with ``values`` (field name -> value; message
    fields take messages, repeated fields lists)."""
    msg = message_class(desc)()
    for name, v in values.items():
        f = desc.fields_by_name[name]
        if f.is_repeated:
            getattr(msg, name).extend(v)
        elif f.type == _FD.TYPE_MESSAGE:
            getattr(msg, name).CopyFrom(v)
        else:
            setattr(msg, name, v)
    return msg


#: Field name -> (kind, values): a hint applies to the fields of that name
#: and kind ("int", "float", "str", "bytes", "bool"; SnapshotMarker.keep is a
#: count, ResolveRequest.keep an address).
Hints = Mapping[str, tuple[str, st.SearchStrategy[Any]]]


def _kind(f: _d.FieldDescriptor) -> str:
    t = f.type
    if t in (_FD.TYPE_DOUBLE, _FD.TYPE_FLOAT):
        return "float"
    if t == _FD.TYPE_STRING:
        return "str"
    if t == _FD.TYPE_BYTES:
        return "bytes"
    if t == _FD.TYPE_BOOL:
        return "bool"
    return "int"  # integers and enums


def field_strategy(
    f: _d.FieldDescriptor, hints: Hints, depth: int, *, small: bool = False
) -> st.SearchStrategy[Any]:
    """Values of field ``f`` (a list for a repeated field)."""
    if f.type == _FD.TYPE_MESSAGE:
        assert f.message_type is not None
        one: st.SearchStrategy[Any] = message_strategy(f.message_type, hints, depth + 1, small=small)
    else:
        one = scalar_strategy(f, small=small)
        hint = hints.get(f.name)
        if hint is not None and hint[0] == _kind(f):
            one = st.one_of(hint[1], one)
    if not f.is_repeated:
        return one
    if small or depth >= MAX_DEPTH:
        return st.lists(one, max_size=2)
    # A huge count: HUGE_COUNT copies of one small entry (10**4 distinct
    # hypothesis draws would cost more than the whole budget).
    small_one = (
        message_strategy(f.message_type, hints, depth + 1, small=True)
        if f.message_type is not None
        else scalar_strategy(f, small=True)
    )
    return st.one_of(st.lists(one, max_size=4), small_one.map(lambda e: [e] * HUGE_COUNT))


def _named(name: str, values: st.SearchStrategy[Any]) -> st.SearchStrategy[tuple[str, Any] | None]:
    return values.map(lambda v: (name, v))


def message_strategy(
    desc: _d.Descriptor, hints: Hints | None = None, depth: int = 0, *, small: bool = False
) -> st.SearchStrategy[Message]:
    """Messages of type ``desc`` with a random subset of fields set (see the
    module docstring); ``hints`` by field name."""
    hints = hints or {}
    if depth > MAX_DEPTH:
        return st.just(message_class(desc)())
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for f in desc.fields:
        if f.containing_oneof is None:
            optional[f.name] = field_strategy(f, hints, depth, small=small)
    oneofs = [
        st.one_of(st.just(None), *[_named(f.name, field_strategy(f, hints, depth, small=small)) for f in o.fields])
        for o in desc.oneofs
    ]

    def assemble(parts: tuple[dict[str, Any], list[tuple[str, Any] | None]]) -> Message:
        values, chosen = parts
        values = dict(values)
        for c in chosen:
            if c is not None:
                values[c[0]] = c[1]
        return build_message(desc, values)

    return st.tuples(st.fixed_dictionaries({}, optional=optional), st.tuples(*oneofs).map(list)).map(assemble)


def mutated_bytes(msgs: st.SearchStrategy[Message]) -> st.SearchStrategy[bytes]:
    """Random bytes sent as a serialized message (module docstring)."""

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        raw = draw(msgs).SerializeToString()
        how = draw(st.sampled_from(["truncate", "flip", "append", "prefix"]))
        if how == "truncate" and raw:
            return raw[: draw(st.integers(0, len(raw) - 1))]
        if how == "flip" and raw:
            i = draw(st.integers(0, len(raw) - 1))
            return raw[:i] + bytes([raw[i] ^ draw(st.integers(1, 255))]) + raw[i + 1:]
        if how == "prefix":
            return draw(st.binary(min_size=1, max_size=8)) + raw
        return raw + draw(st.binary(min_size=1, max_size=16))

    noise = st.one_of(
        st.binary(max_size=256),
        st.sampled_from([b"\xff", b"\x08", b"\x0a\xff\xff\xff\xff\x0f", b"\x80" * 11, b"\x0f" * 64]),
        st.sampled_from(BYTES_EDGES[5:]),
    )
    return st.one_of(noise, mutate())


class LoopThread:
    """An asyncio event loop running on its own thread (see the module docstring)."""

    def __init__(self, name: str = "fuzz-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float, what: str) -> T:
        """Run ``coro`` on the loop; fail (naming ``what``) if it takes longer than ``timeout_s``."""
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout_s)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise AssertionError(f"HANG: {what} did not finish within {timeout_s:g} s") from None

    def call(self, fn: Callable[[], Coroutine[Any, Any, T]], timeout_s: float, what: str) -> T:
        return self.run(fn(), timeout_s, what)

    def close(self) -> None:
        async def drain() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(drain(), self.loop).result(10.0)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10.0)
        self.loop.close()
