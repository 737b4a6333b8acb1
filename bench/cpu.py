"""CPU time a target process spends, read from ``/proc/<pid>/stat`` (Linux).

Throughput on a shared machine moves with whatever else runs; the CPU a process itself spends per
request moves far less, so ``make bench`` reads it before and after each measured wrk run. A process's
CPU is its ``utime + stime`` (every thread included; reaped children's ``cutime``/``cstime`` excluded),
summed over the process and its live descendants — nginx's worker is a child of its master; the
Python targets have none.
"""

from __future__ import annotations

import os
from pathlib import Path

PROC = Path("/proc")


def ticks_per_second() -> int:
    try:
        return int(os.sysconf("SC_CLK_TCK"))
    except (AttributeError, ValueError, OSError):
        return 100


def parse_stat(text: str) -> tuple[int, int]:
    """``(ppid, utime + stime in clock ticks)`` from the text of ``/proc/<pid>/stat``.

    The command name (field 2) is in parentheses and may itself hold spaces or parentheses, so the
    fields are counted from the last ``)``: then state (3), ppid (4), ..., utime (14), stime (15).
    """
    close = text.rfind(")")
    if close < 0:
        raise ValueError(f"not a /proc/<pid>/stat line: {text[:80]!r}")
    fields = text[close + 2 :].split()
    if len(fields) < 13:
        raise ValueError(f"not a /proc/<pid>/stat line: {text[:80]!r}")
    return int(fields[1]), int(fields[11]) + int(fields[12])


def _read_stat(pid: int, proc: Path) -> tuple[int, int] | None:
    try:
        return parse_stat((proc / str(pid) / "stat").read_text())
    except (OSError, ValueError):
        return None


def descendants(pid: int, parents: dict[int, int]) -> list[int]:
    """``pid`` and every process below it, given each process's parent (``pid -> ppid``)."""
    children: dict[int, list[int]] = {}
    for child, parent in parents.items():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        if current in found:
            continue
        found.append(current)
        todo.extend(sorted(children.get(current, ())))
    return found


def cpu_seconds(pid: int, proc: Path = PROC) -> float | None:
    """CPU seconds (user + system) of ``pid`` and its live descendants; None when it is gone or when
    there is no ``/proc`` (not Linux)."""
    own = _read_stat(pid, proc)
    if own is None:
        return None
    stats: dict[int, tuple[int, int]] = {pid: own}
    try:
        entries = [int(p.name) for p in proc.iterdir() if p.name.isdigit()]
    except OSError:
        entries = []
    for other in entries:
        if other != pid and (found := _read_stat(other, proc)) is not None:
            stats[other] = found
    parents = {p: stat[0] for p, stat in stats.items()}
    ticks = sum(stats[p][1] for p in descendants(pid, parents) if p in stats)
    return ticks / ticks_per_second()


def spent(before: float | None, after: float | None) -> float | None:
    """CPU seconds between two readings of one process; None unless both were read."""
    if before is None or after is None:
        return None
    return max(0.0, after - before)
