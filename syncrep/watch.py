"""``syncrep status`` on a terminal, and ``syncrep status --watch`` (issue 13).

Why a module of its own: the plain ``status`` lines (``syncrep.cli.state_line``)
and ``status --json`` (``syncrep.client.volume_status_dict``) are contracts
that scripts and tests parse; what a person reads on a terminal can change
freely. So the CLI prints the plain lines whenever stdout is not a tty, and
only a tty gets this module's rich output:

* :func:`status_table`: one row per volume, real columns: name, state, epoch,
  each node with its connection state (up / DOWN / NO DATA), the generation,
  the out-of-sync bytes (always, 0 included), the lease, the resync progress;
* :func:`watch`: a ``rich.live.Live`` view redrawn in place every
  ``interval_s`` from ``ListVolumes``, with a progress bar (bytes, rate and
  ETA as the primary reports them) per resyncing volume. A coordinator that
  stops answering keeps the last table on screen with a line saying so, and
  is asked again at the next interval; Ctrl-C ends it (the caller catches
  ``KeyboardInterrupt``). Given several coordinators (``A,B,C``, issue 12)
  it shows the leader's view (``list_volumes`` follows the leader) and names
  that leader in its header; when another one leads, one line above the view
  says which was lost and why, and a view that only a follower could answer
  (no leader now: node liveness unknown) says so.

Everything shown comes from ``volume_status_dict``: the same figures as
``--json``, never a second derivation.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn
from rich.table import Table
from rich.text import Text

from syncrep.client import ClientError, coordinator_info, coordinator_set, list_volumes, volume_status_dict
from syncrep.core.vocab import parse_address_list
from syncrep.units import format_size

#: How often ``--watch`` asks the coordinator and redraws.
WATCH_INTERVAL_S = 1.0
#: One ListVolumes call of ``--watch`` gives up after this long (the next
#: interval asks again); shorter than the default RPC deadline so a silent
#: coordinator does not freeze the view for long.
WATCH_RPC_TIMEOUT_S = 2.0

_STATE_STYLES = {
    "in_sync": "bold green",
    "degraded": "bold yellow",
    "resyncing": "bold cyan",
    "primary_lost": "bold red",
    "split_brain": "bold magenta",
}


def _node_cell(v: dict[str, Any], role: str) -> Text:
    """The node's address and, on the line below, its connection state."""
    address = v[role] or "-"
    if v.get(f"{role}_data_missing"):
        return Text.assemble(address, "\n", ("NO DATA", "bold red"))
    if v[f"{role}_alive"]:
        return Text.assemble(address, "\n", ("up", "green"))
    return Text.assemble(address, "\n", ("DOWN", "bold red"))


def _resync_cell(v: dict[str, Any]) -> str:
    r = v["resync"]
    if v["state"] != "resyncing" and not r["bytes_total"]:
        return "-"
    pct = 100.0 * r["bytes_done"] / r["bytes_total"] if r["bytes_total"] else 0.0
    return (
        f"{pct:.0f}% of {format_size(r['bytes_total'])}\n{format_size(int(r['rate_bytes_per_s']))}/s\n"
        f"eta {r['eta_s']:.1f} s, round {r['round']}"
    )


def _generation_cell(v: dict[str, Any]) -> Text:
    """The primary's generation; the secondary's below it (yellow) when it differs."""
    gen, sgen = v.get("generation", 0), v.get("secondary_generation", 0)
    text = Text(f"{gen:016x}" if gen else "none")
    if sgen != gen:
        text.append(f"\n{sgen:016x}" if sgen else "\nnone", style="yellow")
    return text


def status_table(vols: Sequence[dict[str, Any]], *, title: str | None = "syncrep volumes") -> Table:
    """The volumes (``volume_status_dict`` dicts) as a rich Table."""
    table = Table(title=title, title_justify="left", expand=False, box=box.SIMPLE_HEAVY,
                  pad_edge=False, collapse_padding=True)
    table.add_column("name", style="bold", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("epoch", justify="right", no_wrap=True)
    table.add_column("primary", no_wrap=True)
    table.add_column("secondary", no_wrap=True)
    table.add_column("generation", no_wrap=True)
    table.add_column("out of sync", justify="right", no_wrap=True)
    table.add_column("lease", justify="right", no_wrap=True)
    table.add_column("resync")
    for v in vols:
        lease = v.get("lease_remaining_s", 0.0)
        table.add_row(
            v["name"],
            Text(v["state"], style=_STATE_STYLES.get(v["state"], "")),
            str(v["epoch"]),
            _node_cell(v, "primary"),
            _node_cell(v, "secondary"),
            _generation_cell(v),
            format_size(v.get("out_of_sync_bytes", 0)),
            f"{lease:.1f} s" if lease > 0 else "-",
            _resync_cell(v),
        )
    return table


def _notes(vols: Sequence[dict[str, Any]]) -> list[Text]:
    """What the table has no column for: the last error, a split brain's figures."""
    out: list[Text] = []
    for v in vols:
        sb = v.get("split_brain")
        if sb:
            out.append(Text(
                f"{v['name']}: split brain since generation {sb['common_generation']:016x}: primary changed "
                f"{format_size(sb['primary_changed_bytes'])} (at most), secondary changed "
                f"{format_size(sb['secondary_changed_bytes'])}; resolve with 'syncrep resolve {v['name']} "
                "--keep HOST:PORT'", style="magenta",
            ))
        if v["last_error"]:
            out.append(Text(f"{v['name']}: last error: {' '.join(v['last_error'].split())}", style="dim"))
    return out


def print_status(vols: Sequence[dict[str, Any]], console: Console | None = None) -> None:
    """One ``syncrep status`` on a terminal: the table and its notes."""
    console = console or Console()
    if not vols:
        console.print("no volumes")
        return
    console.print(status_table(vols))
    for note in _notes(vols):
        console.print(note)


class _Bars:
    """One progress bar per resyncing volume, fed with the primary's figures
    (rich's own speed estimate would only see the 1 s samples)."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("[bold cyan]{task.description}"),
            BarColumn(bar_width=40),
            TaskProgressColumn(),
            TextColumn("{task.fields[done]}"),
            TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[eta]}"),
            auto_refresh=False,
        )
        self.tasks: dict[str, TaskID] = {}

    def update(self, vols: Sequence[dict[str, Any]]) -> None:
        resyncing = {v["name"]: v for v in vols if v["state"] == "resyncing"}
        for name in list(self.tasks):
            if name not in resyncing:
                self.progress.remove_task(self.tasks.pop(name))
        for name, v in resyncing.items():
            r = v["resync"]
            done = f"{format_size(r['bytes_done'])}/{format_size(r['bytes_total'])}"
            rate = f"{format_size(int(r['rate_bytes_per_s']))}/s"
            eta = f"eta {r['eta_s']:.1f} s"
            total = max(1, r["bytes_total"])
            description = f"{name} resync round {r['round']}"
            if name not in self.tasks:
                self.tasks[name] = self.progress.add_task(description, total=total, done=done, rate=rate, eta=eta)
            self.progress.update(self.tasks[name], description=description, total=total,
                                 completed=min(r["bytes_done"], total), done=done, rate=rate, eta=eta)

    def __bool__(self) -> bool:
        return bool(self.tasks)


def _frame(coordinator: str, vols: Sequence[dict[str, Any]] | None, bars: _Bars, problem: str | None,
           volume: str | None) -> RenderableType:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    header = Text.assemble(("syncrep status --watch", "bold"), f"  coordinator {coordinator}  {stamp}  ",
                           ("(Ctrl-C to exit)", "dim"))
    parts: list[RenderableType] = [header]
    if vols is None:
        parts.append(Text("waiting for the coordinator...", style="dim"))
    elif not vols:
        parts.append(Text(f"no volume {volume!r}" if volume else "no volumes"))
    else:
        parts.append(status_table(vols, title=None))
        if bars:
            parts.append(bars.progress)
        parts.extend(_notes(vols))
    if problem:
        parts.append(Text(problem, style="bold red"))
    return Group(*parts)


async def fetch(coordinator: str, volume: str | None, *, timeout_s: float) -> list[dict[str, Any]]:
    """The volumes as ``volume_status_dict`` dicts, by name (only ``volume`` if given)."""
    vols = [volume_status_dict(v) for v in await list_volumes(coordinator, timeout_s=timeout_s)]
    vols.sort(key=lambda v: v["name"])
    return [v for v in vols if volume is None or v["name"] == volume]


async def lost_line(coordinator: str, old: str, new: str) -> str:
    """The line said when ``new`` leads instead of ``old``: what ``old`` is now (asked)."""
    why = "gone"
    for info in await coordinator_info(coordinator, timeout_s=WATCH_RPC_TIMEOUT_S):
        if info["address"] == old:
            detail = info.get("error") or info.get("why_not_leader") or ""
            why = info["state"] + (f": {' '.join(str(detail).split())}" if detail else "")
    return f"status --watch: coordinator {old} lost ({why}); following the leader {new}"


async def watch(coordinator: str, volume: str | None = None, *, interval_s: float = WATCH_INTERVAL_S,
                console: Console | None = None) -> None:
    """Redraw the status in place every ``interval_s`` until cancelled (Ctrl-C)."""
    console = console or Console()
    bars = _Bars()
    vols: list[dict[str, Any]] | None = None
    problem: str | None = None
    several = len(parse_address_list(coordinator)) > 1
    following: str | None = None  # the leader the view comes from (several coordinators)
    with Live(_frame(coordinator, vols, bars, problem, volume), console=console, auto_refresh=False,
              transient=False, redirect_stdout=False, redirect_stderr=False) as live:
        while True:
            started = time.monotonic()
            try:
                vols = await fetch(coordinator, volume, timeout_s=min(WATCH_RPC_TIMEOUT_S, interval_s * 2))
                bars.update(vols)
                problem = None
                if several:
                    # Who answered: list_volumes followed the leader, or fell
                    # back on a follower's copy when none could be reached.
                    leader = coordinator_set(coordinator).leader
                    if leader is None:
                        problem = ("no coordinator leads now: this is a follower's copy of the store (node "
                                   f"liveness unknown); asking again every {interval_s:g} s")
                    elif leader != following:
                        if following is not None:
                            live.console.print(Text(await lost_line(coordinator, following, leader),
                                                    style="bold yellow"))
                        following = leader
            except ClientError as e:
                # Keep the last table: it is what was known, and says so.
                problem = f"{' '.join(str(e).split())}; asking again every {interval_s:g} s"
            live.update(_frame(following or coordinator, vols, bars, problem, volume), refresh=True)
            await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - started)))
