"""Node configuration: every limit explicit, every unit in the name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Durability = Literal["sync", "os"]
FailurePolicy = Literal["continue", "block"]
QuorumLossPolicy = Literal["suspend", "io-error"]


@dataclass(frozen=True)
class NodeOptions:
    """Options of a node process (``syncrep primary`` / ``syncrep secondary``)."""

    # "sync": a write is acknowledged only once durable (fdatasync, group
    # commit) on both nodes. "os": page cache only — for benchmarking; a power
    # loss can lose acknowledged writes.
    durability: Durability = "sync"
    # No ack from the secondary within this long -> the secondary is declared
    # failed and the pair goes degraded.
    ack_timeout_s: float = 1.0
    # What the primary does with client writes while degraded: "continue"
    # (default, like DRBD) keeps accepting them and tracks them for resync;
    # "block" fails them with UNAVAILABLE.
    on_secondary_failure: FailurePolicy = "continue"
    # A primary writes without its secondary only under a lease from the
    # coordinator (docs/FAILOVER.md). Without one: "suspend" (default) makes
    # such writes wait up to quorum_loss_timeout_s for a lease, then fail with
    # UNAVAILABLE (EIO over NBD); "io-error" fails them at once.
    on_quorum_loss: QuorumLossPolicy = "suspend"
    quorum_loss_timeout_s: float = 30.0
    # Replication window: writes sent to the secondary but not yet acked.
    window_writes: int = 256
    window_bytes: int = 32 * 1024 * 1024
    # Group commit: at most this many writes / bytes in one batch.
    batch_max_writes: int = 64
    batch_max_bytes: int = 4 * 1024 * 1024
    # Client write queue per volume (beyond the replication window).
    queue_writes: int = 1024
    # Connection setup to the secondary: tenacity backoff bounds.
    connect_timeout_s: float = 2.0
    connect_attempts: int = 5
    # Test hooks (NodeService.InjectFault); off in production.
    enable_fault_injection: bool = False
    # Resync (method step 3).
    resync_chunk_bytes: int = 1024 * 1024
    resync_max_rate_bytes_per_s: int = 0  # 0 = unlimited
    # The node's resync budget (issue 14): at most this many resyncs run at
    # once on the node (the others queue), all under one rate (0 = unlimited).
    max_concurrent_resyncs: int = 4
    node_resync_max_rate_bytes_per_s: int = 0
    diff_delay_s: float = 0.0  # variant B: wait before the second diff snapshot
    # Diff rounds continue while the remaining difference shrinks and exceeds
    # this; the last round is sent with writes paused, so it bounds the stall.
    final_diff_threshold_bytes: int = 1024 * 1024
    max_diff_rounds: int = 8
    # Periodic common snapshots (0 = off) and how many to keep.
    snapshot_period_s: float = 0.0
    snapshots_keep: int = 3
    # NBD export of the node's volumes ("" = off): "HOST:PORT", "unix:/path",
    # or several, comma-separated. Export name = volume name (read-write on the
    # primary, read-only on the secondary); "VOLUME@SNAPSHOT" is a read-only
    # snapshot. See syncrep/nbd.
    nbd_listen: str = ""
    # Prometheus metrics ("" = off): "HOST:PORT" serves GET /metrics (plain
    # HTTP, no authentication: a management network or loopback). See
    # syncrep/metrics.py.
    metrics_listen: str = ""
