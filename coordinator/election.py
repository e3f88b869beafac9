"""Leader election among coordinators on etcd (issue 12).

Any number of coordinators share one etcd cluster; one of them leads. Only the
leader hands out epochs, grants primary leases, promotes, drives resyncs and
creates or deletes volumes; the others answer status and redirect the rest
to ``leader()``.

The recipe is etcd's own (``clientv3/concurrency``: a ``Session`` is a lease
kept alive; ``Election.Campaign`` puts a key bound to it in a transaction
``If(CreateRevision(key) == 0) Then(Put(key, value, lease)) Else(Get(key))``;
the leader is the holder of that key; ``Proclaim``/``Resign`` compare the
key before touching it), in its single-key form: etcd's puts one key per
candidate under a prefix (``prefix/<lease id>``) and the leader is the key
with the lowest ``create_revision``, which queues the candidates in order.
We need no queue -- a follower just campaigns again every
``campaign_interval_s`` -- and one key gives the same guarantee: at most one
value under the key at a time, and it disappears with its holder's lease.
The value is ``<address>\\n<lease id, hex>``: unique to this campaign (a
restarted coordinator with the same address, or two processes misconfigured
with one address, hold different values), so ``fence()`` -- (key, value) --
lets ``EtcdStore`` compare the key to it in every write's transaction: a
deposed leader, whatever it believes, writes nothing.

``is_leader()`` is the local view, checked by the service on EVERY mutating
step (not only by the loop here): True only while the key was last seen
holding our value AND the lease certainly still runs on etcd's side: the
last successful keepalive was SENT at ``t`` and etcd answered with TTL
``ttl``, so etcd cannot expire the lease before ``t + ttl``; we stop at
``t + ttl - safety_margin_s`` (monotonic; the margin covers clock-rate
drift and the time between the answer and the action). A keepalive answered
"lease gone" turns it False at once. A keepalive that FAILS (no answer, a
connection error) is retried every ``retry_interval_s``; only when none has
succeeded for ``unreachable_after_s`` (default half the TTL) does etcd count
as unreachable and leadership end -- earlier than the lease could expire, so
still safe. Why not at the first failure: one etcd member of three killed
(its connection breaks under the RPC in flight) or an etcd raft election
(0.5-1 s with no leader) is not "cannot reach etcd", and must not interrupt
leadership (issue 12: "one etcd member lost: no interruption"); dropping it
would cost a new term (a store reload and a full lease wait before any
promotion). Safety never rested on that: the lease cannot expire on etcd's
side before ``valid_until``, and every store write is fenced by the key.

``longest_lease_wait_s``: how long a NEW leader waits before it promotes
anything -- the longest primary lease a previous leader could have granted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import aetcd.exceptions  # type: ignore[import-untyped]

from coordinator.etcd_store import DEFAULT_OP_TIMEOUT_S, EtcdTls, connect_client
from syncrep.aio import within
from syncrep.core.driver import Policy

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CAMPAIGN_INTERVAL_S",
    "DEFAULT_ELECTION_KEY",
    "DEFAULT_TTL_S",
    "Election",
    "leader_of_value",
    "longest_lease_wait_s",
]

DEFAULT_ELECTION_KEY = "/syncrep/v1/leader"
#: The election lease's TTL (etcd counts it in whole seconds).
DEFAULT_TTL_S = 5
#: How often a follower campaigns again (and the leader re-checks the key):
#: a leader's loss is noticed within ``ttl + campaign_interval_s``.
DEFAULT_CAMPAIGN_INTERVAL_S = 0.5
#: How soon a failed keepalive or campaign is tried again (the channel
#: round-robins over the etcd members: the next try may reach another).
DEFAULT_RETRY_INTERVAL_S = 0.1


def leader_of_value(value: bytes) -> str:
    """The leader's address in an election key's value (``address\\nlease``)."""
    return value.decode(errors="replace").split("\n", 1)[0]


def longest_lease_wait_s(policy: Policy, election_ttl_s: float = DEFAULT_TTL_S) -> float:
    """How long a new leader waits, from when it won, before it promotes anything.

    A previous leader granted primary leases only while it led in its own
    view, which ends before etcd expires its election lease (``is_leader``);
    a lease it granted then runs ``lease_s`` (``lease_drift_s`` more for clock
    drift, as ``driver.lease_remaining_s`` counts it). The election TTL is
    added for the grants in flight when it lost etcd: a reply sent just
    before its view expired reaches the primary up to a TTL later at worst
    (the previous leader's TTL: the coordinators share the setting)."""
    return policy.lease_s + policy.lease_drift_s + election_ttl_s


class Election:
    """One coordinator's campaign for the key ``key`` on etcd.

    ``etcd``: endpoints ("host:port", a list or comma-separated; ``tls``: TLS
    to them) or an aetcd client created on the loop that runs this election. ``on_change(is_leader,
    leader_address)`` is called (on the loop) whenever either changes.
    ``start()`` campaigns in a task; ``resign()`` gives the key up and stops.
    """

    def __init__(
        self,
        etcd: Sequence[str] | str | Any,
        my_address: str,
        *,
        key: str = DEFAULT_ELECTION_KEY,
        ttl_s: int = DEFAULT_TTL_S,
        safety_margin_s: float | None = None,
        campaign_interval_s: float = DEFAULT_CAMPAIGN_INTERVAL_S,
        op_timeout_s: float = DEFAULT_OP_TIMEOUT_S,
        unreachable_after_s: float | None = None,
        retry_interval_s: float = DEFAULT_RETRY_INTERVAL_S,
        on_change: Callable[[bool, str | None], None] | None = None,
        clock: Callable[[], float] | None = None,
        tls: EtcdTls | None = None,
    ) -> None:
        if not isinstance(ttl_s, int) or ttl_s < 1:
            raise ValueError(
                f"Election: ttl_s ({ttl_s!r}) must be a whole number of seconds >= 1 (etcd's unit)"
            )
        margin = max(0.2, ttl_s * 0.2) if safety_margin_s is None else safety_margin_s
        if not 0 <= margin < ttl_s:
            raise ValueError(f"Election: safety_margin_s ({margin}) must be in [0, ttl_s={ttl_s})")
        unreachable = ttl_s / 2 if unreachable_after_s is None else unreachable_after_s
        if not 0 <= unreachable <= ttl_s:
            raise ValueError(f"Election: unreachable_after_s ({unreachable}) must be in [0, ttl_s={ttl_s}]")
        if not 0 < retry_interval_s <= campaign_interval_s:
            raise ValueError(
                f"Election: retry_interval_s ({retry_interval_s}) must be in (0, campaign_interval_s="
                f"{campaign_interval_s}]"
            )
        if not my_address or "\n" in my_address:
            raise ValueError(f"Election: bad address {my_address!r}")
        self._endpoints: Sequence[str] | None = None
        self._client: Any = None
        if isinstance(etcd, str):
            self._endpoints = [e.strip() for e in etcd.split(",") if e.strip()]
        elif isinstance(etcd, Sequence):
            self._endpoints = list(etcd)
        else:
            self._client = etcd
        self._own_client = self._client is None
        self._tls = tls
        self.my_address = my_address
        self.key = key.encode()
        self.ttl_s = ttl_s
        self.safety_margin_s = margin
        self.campaign_interval_s = campaign_interval_s
        self.op_timeout_s = op_timeout_s
        self.unreachable_after_s = unreachable
        self.retry_interval_s = retry_interval_s
        self.on_change = on_change
        self._clock: Callable[[], float] = clock if clock is not None else (lambda: time.monotonic())

        self._lease_id: int | None = None
        self._value: bytes | None = None  # our value in the key (with the current lease)
        self._holds_key = False  # the key was last seen holding our value
        self._keepalive_ok = False  # the last keepalive succeeded
        self._valid_until = 0.0  # (clock) when our view of the lease may have expired
        self._holder: bytes | None = None  # the key's value as last seen
        self._last_error = ""
        self._failing_since: float | None = None  # (clock) the first failed attempt of the current run
        self._task: asyncio.Task[None] | None = None
        self._reported: tuple[bool, str | None] = (False, None)

    # ------------------------------------------------------------ the view

    def is_leader(self) -> bool:
        """True only while this coordinator certainly leads (see the module docstring)."""
        if not (self._holds_key and self._keepalive_ok):
            return False
        now = self._clock()
        return now < self._valid_until and now < self._gives_up_at()

    def _gives_up_at(self) -> float:
        """(clock) when failed keepalives have lasted ``unreachable_after_s`` (inf: none failing)."""
        return float("inf") if self._failing_since is None else self._failing_since + self.unreachable_after_s

    def leader(self) -> str | None:
        """The current leader's address as last seen (None: none known, or our own view expired)."""
        if self._holder is None:
            return None
        if self._holder == self._value and not self.is_leader():
            return None
        return leader_of_value(self._holder)

    def fence(self) -> tuple[bytes, bytes] | None:
        """(election key, our value) for ``EtcdStore``'s transactions, or None when we do not lead."""
        if not self.is_leader() or self._value is None:
            return None
        return self.key, self._value

    def why_not_leader(self) -> str:
        """For messages and status: why ``is_leader()`` is False (or "" when it is True)."""
        if self.is_leader():
            return ""
        if self._last_error:
            return f"cannot reach etcd: {self._last_error}"
        if self._failing_since is not None:
            return f"no keepalive answered for {self.unreachable_after_s:g} s"
        if self._holds_key and self._clock() >= self._valid_until:
            return "its election lease may have expired (no keepalive answered in time)"
        leader = self.leader()
        return f"{leader} leads" if leader else "no leader elected yet"

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("election already started")
        if self._client is None:
            assert self._endpoints is not None
            self._client = connect_client(self._endpoints, self.op_timeout_s, self._tls)
        self._task = asyncio.get_running_loop().create_task(self._campaign_loop(), name="election")

    async def resign(self) -> None:
        """Stop campaigning; give the key up if we hold it (a follower can win
        at once) and revoke our lease. Bounded by ``op_timeout_s`` per RPC."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        client, value, lease = self._client, self._value, self._lease_id
        self._holds_key = self._keepalive_ok = False
        self._lease_id = self._value = None
        if client is not None and value is not None:
            t = client.transactions
            try:
                await asyncio.wait_for(
                    client.transaction(
                        compare=[t.value(self.key) == value], success=[t.delete(self.key)], failure=[]
                    ),
                    self.op_timeout_s,
                )
                if lease is not None:
                    await asyncio.wait_for(client.revoke_lease(lease), self.op_timeout_s)
            except (TimeoutError, aetcd.exceptions.ClientError) as e:
                # The lease expires by itself within its TTL: nobody else waits longer.
                log.warning(
                    "election: resigning %s: %s (the lease expires within %d s)",
                    self.my_address,
                    e,
                    self.ttl_s,
                )
        if self._holder == value:
            self._holder = None
        self._notify()
        if self._own_client and client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), self.op_timeout_s)
            self._client = None

    stop = resign

    def use_tls(self, tls: EtcdTls) -> None:
        """SIGHUP (issue 11; on the election's loop, from ``EtcdStore.reload_tls``):
        the next step runs on a new client presenting ``tls``'s certificates. The
        lease is etcd's, not the connection's: it carries over. The old client
        is closed after ``op_timeout_s`` (a step in flight on it finishes)."""
        self._tls = tls
        if not self._own_client or self._endpoints is None or self._client is None:
            return  # an injected client, or not running: start() uses the new _tls
        old, self._client = self._client, connect_client(self._endpoints, self.op_timeout_s, tls)
        loop = asyncio.get_running_loop()

        async def close_old() -> None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(old.close(), self.op_timeout_s)

        loop.call_later(self.op_timeout_s, lambda: loop.create_task(close_old()))

    # ------------------------------------------------------------ the loop

    def _notify(self) -> None:
        now = (self.is_leader(), self.leader())
        if now != self._reported:
            was = self._reported
            self._reported = now
            if now[0] and not was[0]:
                log.info("election: %s leads (key %s)", self.my_address, self.key.decode())
            elif was[0] and not now[0]:
                log.warning("election: %s no longer leads: %s", self.my_address, self.why_not_leader())
            if self.on_change is not None:
                try:
                    self.on_change(*now)
                except Exception:
                    log.exception("election: the on_change callback failed")

    async def _campaign_loop(self) -> None:
        while True:
            failed = False
            try:
                await self._step()
                self._last_error = ""
                self._failing_since = None
            except (TimeoutError, aetcd.exceptions.ClientError, OSError) as e:
                failed = True
                now = self._clock()
                error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                if self._failing_since is None:
                    self._failing_since = now
                    if self.is_leader():
                        log.info(
                            "election: %s: a keepalive failed (%s); retrying every %g s, leadership holds "
                            "for %g s more at most",
                            self.my_address, error, self.retry_interval_s,
                            min(self._gives_up_at(), self._valid_until) - now,
                        )
                if now >= self._gives_up_at():
                    # Unreachable for long enough (is_leader() is False from the
                    # clock alone): say why in why_not_leader().
                    self._last_error = error
                self._let_expired_lease_go(now)
            self._notify()
            # A leader renews its lease well within its TTL; a follower campaigns again;
            # a failed attempt is retried soon (another etcd member may answer).
            interval = self.retry_interval_s if failed else min(self.campaign_interval_s, self.ttl_s / 3)
            await asyncio.sleep(interval)
            self._notify()  # the view may have expired while sleeping

    def _let_expired_lease_go(self, now: float) -> None:
        """After a failed step: once the view has expired, stop refreshing the lease.

        A keepalive that reaches etcd while its answer is lost (a one-way cut)
        would otherwise keep the lease, and the election key with it, alive for
        as long as the cut lasts: no coordinator could lead. Dropped, it expires
        within its TTL; the next step campaigns with a new lease."""
        if self._lease_id is None or now < self._valid_until:
            return
        log.warning("election: %s: no keepalive answered while its view lasted; letting lease %x expire",
                    self.my_address, self._lease_id)
        self._lease_id = self._value = None
        self._holds_key = self._keepalive_ok = False

    def _attempt_timeout_s(self) -> float:
        return min(self.op_timeout_s, self.ttl_s / 4)

    async def _step(self) -> None:
        # within(), not wait_for: resign() cancels this loop and awaits it (syncrep/aio.py).
        c = self._client
        t = c.transactions
        if self._lease_id is None:
            sent = self._clock()
            lease = await within(self.op_timeout_s, c.lease(self.ttl_s))
            self._lease_id = lease.id
            self._value = f"{self.my_address}\n{lease.id:x}".encode()
            self._valid_until = sent + lease.ttl - self.safety_margin_s
            self._keepalive_ok = True
        else:
            sent = self._clock()
            # Bounded well inside the view's validity: an RPC stuck on a lost
            # member must leave time to retry on the others.
            reply = await within(self._attempt_timeout_s(), c.refresh_lease(self._lease_id))
            if reply is None or reply.TTL <= 0:
                # The lease is gone on etcd's side (expired, revoked): so is our key.
                log.warning("election: %s's lease %x expired or was revoked", self.my_address, self._lease_id)
                self._lease_id = self._value = None
                self._holds_key = self._keepalive_ok = False
                return
            self._valid_until = sent + reply.TTL - self.safety_margin_s
            self._keepalive_ok = True
        assert self._value is not None
        ok, responses = await within(
            self._attempt_timeout_s(),
            c.transaction(
                compare=[t.create(self.key) == 0],
                success=[t.put(self.key, self._value, lease=self._lease_id)],
                failure=[t.get(self.key)],
            ),
        )
        if ok:
            self._holder = self._value
        else:
            got = responses[0]
            self._holder = got[0][0] if got else None
        self._holds_key = self._holder == self._value
