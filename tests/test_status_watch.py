"""``syncrep status [VOLUME] [--watch]`` (issue 13), with real processes.

``--watch`` is driven in a pseudo-terminal (``os.openpty``, TERM=xterm-256color,
COLUMNS=120) during a real resync: the captured output must show the view
redrawn in place (several frames, cursor-up sequences), the volume's state and
a progress bar, and Ctrl-C (SIGINT) must end it with 0 or 130 and no
traceback. On a terminal a one-shot ``status`` prints the rich table; when
stdout is not a terminal (a pipe) ``status`` keeps printing the plain lines
scripts parse, also with ``--watch`` (printed once). Each test ends with the
replicas compared block for block and every acknowledged write checked.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from conftest import wait_until
from e2e_helpers import assert_replicas_identical, check_model, wait_state, write_blocks

from deploy.cluster import LocalCluster
from syncrep.cli import state_line
from syncrep.client import volume_status_dict
from syncrep.pb import syncrep_pb2 as pb

VOL = "vol0"
SIZE = 16 << 20
BLOCK = 4096
#: How long the live view runs in the pty before Ctrl-C (it redraws every second).
WATCH_RUN_S = 4.0
#: An ANSI escape sequence (CSI ... final byte, or OSC ... BEL).
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
#: rich.live moves the cursor up over the previous frame before drawing the next.
CURSOR_UP = "\x1b[1A"


class PtyProcess:
    """A command whose stdin, stdout and stderr are a pseudo-terminal; its
    output is collected by a thread until the terminal closes."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=str(cwd),
                                     start_new_session=True)
        os.close(slave)
        self.chunks: list[bytes] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: every slave end is closed
                return
            if not data:
                return
            self.chunks.append(data)

    @property
    def output(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")

    def interrupt(self, timeout_s: float = 60.0) -> int:
        """Ctrl-C, as the terminal sends it (SIGINT to the process); the exit code.
        ``timeout_s`` is generous: under load (CI once, load ~8) the exit took
        longer than 15 s; a view that never exits still fails."""
        self.proc.send_signal(signal.SIGINT)
        rc = self.proc.wait(timeout=timeout_s)
        self._thread.join(timeout=5.0)
        os.close(self.master)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5.0)


def _tty_env(c: LocalCluster) -> dict[str, str]:
    env = c._environ()
    env.update(TERM="xterm-256color", COLUMNS="120", LINES="40")
    env.pop("NO_COLOR", None)
    return env


#: The first line of every frame of the live view.
FRAME_HEADER = "syncrep status --watch"


def last_frame(output: str) -> str:
    """The last frame of a rich.live capture (from its header line), escapes removed."""
    text = ANSI.sub("", output).replace("\r", "")
    text = text[text.rindex(FRAME_HEADER):]
    return "\n".join(ln.rstrip() for ln in text.splitlines() if ln.strip())


async def test_status_watch_in_a_pty_redraws_during_resync_and_exits_on_ctrl_c(
    cluster_factory: Any, seed: int
) -> None:
    """Fault: SIGKILL of the secondary (12 MiB written while it is down), then a
    restart; ``status --watch`` runs in a pty during the rate-limited resync.
    Seeded writes: ``seed`` (default: from the test id)."""
    c: LocalCluster = cluster_factory(primary_args=["--resync-max-rate", "1MiB", "--resync-chunk-bytes", "65536"])
    await c.start()
    await c.create_volume(VOL, SIZE, BLOCK)
    cl = await c.connect(VOL)
    model: dict[int, bytes] = {}
    await write_blocks(cl, 0, 128, 16, seed=seed, model=model)
    c.kill("secondary")
    await wait_state(c, VOL, "degraded", timeout_s=20)
    await write_blocks(cl, 128, 3072, 32, seed=seed + 1, model=model)  # 12 MiB while it is down
    await c.restart("secondary")

    def moving(st: pb.VolumeStatus) -> bool:
        return st.state == pb.PAIR_STATE_RESYNCING and st.resync.bytes_total > 0 and st.resync.bytes_done > 0

    await c.wait_for_volume(VOL, moving, timeout_s=60)
    pty = PtyProcess(c.cli_command("status", "--watch"), _tty_env(c), c.workdir)
    try:
        await wait_until(lambda: pty.output.count(CURSOR_UP) >= 1, "a first redraw of status --watch",
                         timeout_s=30)
        t0 = time.monotonic()
        await wait_until(lambda: time.monotonic() - t0 >= WATCH_RUN_S, f"{WATCH_RUN_S:g} s of the live view",
                         timeout_s=WATCH_RUN_S + 1, interval_s=0.1)
        rc = await asyncio.to_thread(pty.interrupt)
    finally:
        pty.kill()
    out = pty.output
    (c.workdir / "status-watch.raw").write_text(out)
    frame = last_frame(out)
    (c.workdir / "status-watch.frame.txt").write_text(frame + "\n")
    print(frame)  # one frame of the captured run, for the closing note (pytest -s)

    assert rc in (0, 130), (rc, out[-2000:])
    assert "Traceback" not in out, out[-4000:]
    plain = ANSI.sub("", out)
    # Redrawn in place: every frame after the first moves the cursor back up over it.
    assert out.count(FRAME_HEADER) >= 3, f"fewer than 3 frames: {plain[-2000:]}"
    assert out.count(CURSOR_UP) >= 3, plain[-2000:]
    assert VOL in frame and "resyncing" in plain, frame
    assert "━" in out and "vol0 resync round" in plain, "no progress bar drawn"
    assert re.search(r"eta \d+\.\d s", plain) and re.search(r"\d+\.\d MiB/s|\d+\.\d KiB/s", plain), plain[-2000:]
    assert "out of sync" in plain and "up" in frame, frame

    await c.wait_for_volume(VOL, "in_sync", timeout_s=90)
    await check_model(c, VOL, model)
    await cl.close()
    await assert_replicas_identical(c, VOL)


async def test_status_on_a_terminal_prints_a_table_and_in_a_pipe_the_plain_lines(
    cluster: LocalCluster, seed: int
) -> None:
    """No fault: ``status`` in a pty prints the table (real columns, out of sync
    always, each node's connection state); in a pipe, ``status``, ``status VOLUME``
    and ``status --watch`` print the plain line (state_line) once; an unknown
    VOLUME is refused. Seeded writes: ``seed``."""
    cl = await cluster.connect(VOL)
    model: dict[int, bytes] = {}
    await write_blocks(cl, 0, 64, 8, seed=seed, model=model)

    pty = PtyProcess(cluster.cli_command("status", VOL), _tty_env(cluster), cluster.workdir)
    try:
        rc = await asyncio.to_thread(pty.proc.wait, 30)
        await asyncio.to_thread(pty._thread.join, 5.0)
    finally:
        pty.kill()
    table = ANSI.sub("", pty.output)
    assert rc == 0, table
    for column in ("name", "state", "epoch", "primary", "secondary", "generation", "out of sync", "lease",
                   "resync"):
        assert column in table, (column, table)
    assert cluster.primary_addr in table and cluster.secondary_addr in table, table
    # Each node's connection state, under its address.
    assert re.search(r"^\s+up\s+up\s*$", table.replace("\r", ""), re.M), table
    assert "0 B" in table and "in_sync" in table, table

    want = state_line(volume_status_dict(await cluster.get_volume(VOL)))
    for args in (("status",), ("status", VOL), ("status", "--watch")):
        r = await cluster.run_cli(*args, timeout_s=30)
        assert r.returncode == 0, (args, r.stderr)
        (line,) = r.stdout.splitlines()
        # The acked counters move with the heartbeats: compare the line up to them.
        assert line.split("  acked ")[0] == want.split("  acked ")[0], (args, line, want)
    unknown = await cluster.run_cli("status", "nosuch", timeout_s=30)
    assert unknown.returncode == 1 and "no volume 'nosuch'" in unknown.stderr, unknown
    as_json = await cluster.run_cli("status", "--json", VOL, timeout_s=30)
    assert as_json.returncode == 0 and '"volumes"' in as_json.stdout, as_json

    await check_model(cluster, VOL, model)
    await cl.close()
    await assert_replicas_identical(cluster, VOL)
