"""A planned stop of the secondary (issue 13): real processes, mutual TLS.

SIGTERM of the secondary under a running workload, three times in a row (the
issue saw a CancelledError traceback in 2 of 3 stops, and every stop waited
the full 5 s grace):

* the secondary tells its primary on the replication stream
  (``ReplicateReply.stopping``, fenced by the stream's epoch) once the writes
  it is applying are acked, and its stop returns without waiting out the
  grace: its exit takes less than ``STOP_BOUND_S`` (generous; a few hundred
  ms on a test box);
* its log has no traceback;
* the primary logs ``secondary X is stopping (planned)`` at WARNING, no ERROR
  line, and still goes degraded (writes stay safe: what the secondary did not
  ack is tracked and resynced);
* the secondary is started again and resynced; the replicas are compared and
  every acknowledged write checked.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import pytest
from e2e_helpers import Workload, assert_replicas_identical, check_no_lost_writes, wait_state

from deploy.cluster import LocalCluster

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
VOL = "vol0"
SIZE = 16 * MiB
#: The stop must return well before the server's 5 s grace (rpc.SHUTDOWN_GRACE_S).
STOP_BOUND_S = 4.0
#: How long the harness waits for the SIGTERMed process before SIGKILL: longer
#: than the grace, so a slow stop shows as slow rather than as killed.
HARNESS_GRACE_S = 15.0
STOPS = 3


def lines_after(text: str, marker: str) -> list[str]:
    """The lines of a log after the last line containing ``marker``."""
    lines = text.splitlines()
    idx = max((i for i, line in enumerate(lines) if marker in line), default=-1)
    return lines[idx + 1:]


@pytest.mark.parametrize("seed", [1312], indirect=True)
async def test_sigterm_of_the_secondary_is_a_planned_stop(cluster_factory: Callable[..., LocalCluster],
                                                          seed: int) -> None:
    """Fault: SIGTERM of the secondary under 3 writers, 3 times, each followed by a restart and a resync.
    Seed 1312."""
    c = cluster_factory()
    await c.start()
    await c.create_volume(VOL, SIZE)
    w = Workload(c, VOL, SIZE, writers=3, seed=seed)
    await w.start()
    try:
        for n in range(1, STOPS + 1):
            await w.wait_acked(w.history.acked + 60)
            t0 = time.monotonic()
            code = await c.stop("secondary", grace_s=HARNESS_GRACE_S)
            took = time.monotonic() - t0
            print(f"stop {n}: the secondary exited {code} after {took:.3f} s")  # the figure (pytest -rP)
            assert code == 0, f"stop {n}: the secondary exited {code}"
            assert took < STOP_BOUND_S, f"stop {n}: the secondary took {took:.2f} s to stop (bound {STOP_BOUND_S} s)"
            sec_log = c.log_tail("secondary", 5000)
            assert "Traceback" not in sec_log and "CancelledError" not in sec_log, f"stop {n}:\n{sec_log[-3000:]}"
            assert "this node is stopping (received SIGTERM)" in sec_log, f"stop {n}: no planned-stop line"
            await wait_state(c, VOL, "degraded", timeout_s=30)
            prim = c.log_tail("primary", 5000)
            planned = [line for line in prim.splitlines()
                       if f"secondary {c.secondary_addr} is stopping (planned)" in line]
            assert len(planned) >= n and all(" WARNING " in line for line in planned), planned
            errors = [line for line in prim.splitlines() if re.search(r"\bERROR\b", line)]
            assert not errors, f"stop {n}: ERROR lines on the primary: {errors}"
            await w.wait_acked(w.history.acked + 30)  # degraded: writes go on
            await c.start_process("secondary")
            await c.wait_for_volume(VOL, "in_sync", timeout_s=90)
    finally:
        await w.stop()
    await assert_replicas_identical(c, VOL)
    await check_no_lost_writes(c, VOL, w)
    assert w.history.acked > STOPS * 90
