"""Processes that must not outlive the process that started them, even when it is SIGKILLed.

A local Ray runtime started by ``ray.init`` leaves ``ray::DashboardAgent`` and
``ray::RuntimeEnvAgent`` running when its driver is killed (their raylet dies, they are
re-parented to init and go on). ``watch_new_processes`` starts a tiny watchdog process that
holds the read end of a pipe and notes every process this one starts: when this process ends,
however it ends, the pipe closes and the watchdog stops them (identified by pid and start time,
so a reused pid is never hit). Linux only (it reads ``/proc``); elsewhere it does nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

_WATCHDOG = r"""
import os, select, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C or a group SIGTERM reaches the parent, which cleans up;
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # this process acts once the pipe closes

def table():
    found = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            found[int(name)] = (int(fields[1]), fields[19])
    return found

def descendants(roots, processes):
    found, frontier = set(), list(roots)
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, started) in processes.items():
            if ppid == parent and (pid, started) not in found:
                found.add((pid, started))
                frontier.append(pid)
    return found

parent = int(sys.stdin.readline())
existing = {tuple(item.split(":")) for item in sys.stdin.readline().split()}
existing = {(int(pid), started) for pid, started in existing}
watched = set()
print("ready", flush=True)
while True:  # until the parent closes the pipe or dies, note every process it starts (and theirs)
    processes = table()
    watched |= descendants([parent, *(pid for pid, _ in watched)], processes) - existing
    watched = {(pid, started) for pid, started in watched if pid != os.getpid()}
    if select.select([sys.stdin], [], [], 0.2)[0] and not sys.stdin.readline():
        break
watched |= descendants([pid for pid, _ in watched], table()) - existing

def alive(pid, started):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[19] == started
    except OSError:
        return False

left = [item for item in watched if alive(*item)]
for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 0.0)):
    for pid, _ in left:
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    deadline = time.monotonic() + wait
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [item for item in left if alive(*item)]
"""


def _descendants(pid: int) -> set[tuple[int, str]]:
    """The (pid, start time) of every living descendant of ``pid``."""
    parents: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        parents[int(entry.name)] = (int(fields[1]), fields[19])
    found: set[tuple[int, str]] = set()
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, started) in parents.items():
            if ppid == parent and (child, started) not in found:
                found.add((child, started))
                frontier.append(child)
    return found


@contextmanager
def watch_new_processes(start: Callable[[], object]) -> Iterator[None]:
    """Call ``start()``; the processes started from now on are stopped when this process ends, or on leaving.

    The watchdog notes this process's new descendants (and theirs) every 0.2 s from before
    ``start()`` until this process closes the pipe, by leaving or by dying.
    """
    if not Path("/proc/self/stat").exists():
        start()
        yield
        return
    existing = " ".join(f"{pid}:{started}" for pid, started in _descendants(os.getpid()))
    watchdog = subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, close_fds=True
    )
    assert watchdog.stdin is not None and watchdog.stdout is not None
    try:
        watchdog.stdin.write(f"{os.getpid()}\n{existing}\n")
        watchdog.stdin.flush()
        watchdog.stdout.readline()  # "ready": it watches before anything starts
        start()
        yield
    finally:
        watchdog.stdin.close()  # what the caller did not stop by now is stopped
        watchdog.wait()
        watchdog.stdout.close()
