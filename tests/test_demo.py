"""``syncrep demo`` tells the whole story and exits 0: replicate, a NACKing
secondary (degraded, failed extents), writes while degraded, resync, kill -9
of the secondary under load, resync again, verify identical, summary."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEMO_TIMEOUT_S = 120.0


@pytest.mark.e2e
def test_demo_runs_the_whole_story(tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(REPO), env.get("PYTHONPATH", "")) if x)
    workdir = tmp_path / "demo"
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "syncrep", "demo", "--workdir", str(workdir), "--seed", "7"],
        capture_output=True,
        timeout=DEMO_TIMEOUT_S,
        env=env,
        cwd=str(REPO),
    )
    elapsed = time.monotonic() - t0
    out = r.stdout.decode()
    err = r.stderr.decode()
    assert r.returncode == 0, f"demo failed ({r.returncode}):\n{out}\n--- stderr ---\n{err}"
    assert "Traceback" not in out + err
    low = out.lower()
    for word in ("degraded", "failed extent", "resync", "kill -9", "in_sync", "identical",
                 "writes acknowledged", "bytes resynced"):
        assert word in low, f"{word!r} missing from the demo output:\n{out}"
    assert "are identical" in out  # the verify summary line
    assert "The replicas are identical. Done." in out
    print(f"demo took {elapsed:.1f} s")
