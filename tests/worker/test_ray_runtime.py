"""A local Ray runtime started by a ``bertbatch run --engine ray`` driver dies with the driver, SIGKILL included."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from exporter.export import ExportResult

try:
    import ray  # noqa: F401
except ImportError:
    if os.environ.get("CI"):
        pytest.fail("ray is missing in CI: the README's install command installs the ray extra", pytrace=False)
    pytest.skip("ray is not installed (pip install '.[ray]')", allow_module_level=True)


def process_tree(root: int) -> dict[int, tuple[str, bytes]]:
    """Every living descendant of ``root``: pid -> (start time, command line)."""
    table: dict[int, tuple[int, str, bytes]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            table[int(entry.name)] = (int(fields[1]), fields[19], (entry / "cmdline").read_bytes())
        except OSError:
            continue
    tree: dict[int, tuple[str, bytes]] = {}
    parents = [root]
    while parents:
        parent = parents.pop()
        for pid, (ppid, started, command) in table.items():
            if ppid == parent and pid not in tree:
                tree[pid] = (started, command)
                parents.append(pid)
    return tree


def still_running(processes: dict[int, tuple[str, bytes]]) -> list[bytes]:
    running = []
    for pid, (started, command) in processes.items():
        try:
            if (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]) == started:
                running.append(command.split(b"\0")[0])
        except OSError:
            continue
    return running


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="the runtime guard reads /proc (Linux)")
def test_a_sigkilled_driver_leaves_no_ray_process_behind(tmp_path: Path, tiny_embed_export: ExportResult) -> None:
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(["alpha", "beta", "gamma", "delta"], size=8)) for _ in range(20_000)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "in.parquet", row_group_size=100)
    command = [
        sys.executable, "-m", "worker.cli", "run", "--engine", "ray", "--num-workers", "1", "--device", "cpu",
        "--model", str(tiny_embed_export.directory), "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"),
        "--text-column", "text", "--rows-per-shard", "100", "--batch-size", "4", "--log-format", "json",
    ]  # fmt: skip
    log = tmp_path / "driver.log"
    with open(log, "w") as stderr:
        driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
    processes: dict[int, tuple[str, bytes]] = {}
    try:
        deadline = time.monotonic() + 180
        while not any(name.startswith(b"ray::DashboardAgent") for _, name in processes.values()):
            assert driver.poll() is None, f"the driver ended before its Ray runtime was up:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "timed out waiting for the driver's Ray runtime"
            time.sleep(0.2)
            processes = process_tree(driver.pid)
        time.sleep(1.0)
        processes = process_tree(driver.pid)  # the runtime as started, agents included
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        deadline = time.monotonic() + 30
        while still_running(processes) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert still_running(processes) == [], "processes of the Ray runtime outlived their driver"
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        for pid, (started, _) in processes.items():  # never leave a failed run's runtime behind
            if still_running({pid: processes[pid]}):
                os.kill(pid, signal.SIGKILL)
