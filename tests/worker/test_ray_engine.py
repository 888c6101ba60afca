"""``--engine ray`` against the local engine, on a local Ray runtime with two CPU workers.

The reference for every Ray run is the local engine's run of the same job: the same
part files, the same ids in the same order, the same schema and the same values.
The inputs have several files of several row groups, shards of several windows
with a short last one, and null texts. Failures are real: an inference actor's
process is SIGKILLed mid-job, and a driver (a `bertbatch run --engine ray`
subprocess on the same cluster) is SIGKILLed after some shards are committed.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from exporter.export import ExportResult
from worker.checks import CheckedJob
from worker.config import RunConfig
from worker.errors import DeviceUnavailable, ModelDirError, TooManyErrors, UsageError
from worker.job import JobSummary, run_job
from worker.jobstate import JOB_FILE, SUCCESS_FILE
from worker.ray_engine import write_on_ray
from worker.runner import ModelDir, open_model_dir
from worker.source import inspect_inputs, plan_shards

try:
    import ray
    from ray.cluster_utils import Cluster
except ImportError:
    if os.environ.get("CI"):
        pytest.fail("ray is missing in CI: the README's install command installs the ray extra", pytrace=False)
    pytest.skip("ray is not installed (pip install '.[ray]')", allow_module_level=True)

pytestmark = pytest.mark.slow  # a Ray runtime takes seconds to start

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing [MASK] matches".split()
TOLERANCE = 1e-5
OBJECT_STORE = 100 * 1024 * 1024  # per node


def write_inputs(directory: Path, rows_per_file: list[int], row_group_rows: int) -> Path:
    """Files of several row groups; every 29th text is null, and an id column numbers the rows."""
    directory.mkdir()
    rng = random.Random(0)
    start = 0
    for index, rows in enumerate(rows_per_file):
        ids = range(start, start + rows)
        texts = [None if i % 29 == 0 else " ".join(rng.choices(WORDS, k=rng.randint(1, 30))) for i in ids]
        table = pa.table({"id": pa.array(ids, pa.int64()), "text": pa.array(texts, pa.string())})
        pq.write_table(table, directory / f"input-{index}.parquet", row_group_size=row_group_rows)
        start += rows
    return directory


NODE_CPUS = 2  # per worker node: an inference actor and a reading task


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Cluster]:
    """A cluster on this machine: a head that runs no work (as on a real cluster) and two worker nodes
    of two logical CPUs each, every node with its own raylet and object store. Tests connect to it as
    the driver; a test that removes a node adds one back."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False, "object_store_memory": OBJECT_STORE})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=NODE_CPUS, object_store_memory=OBJECT_STORE)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()


@pytest.fixture(scope="module")
def ray_runtime(ray_cluster: Cluster) -> Iterator[None]:
    ray.init(address=ray_cluster.address)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def small_inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 files; shards of 2 row groups (40 rows, fewer at a file's end) cut into windows of 16, 16 and 8 rows."""
    return write_inputs(tmp_path_factory.mktemp("ray") / "small", [100, 55, 80], row_group_rows=20)


@pytest.fixture(scope="module")
def long_inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough shards (48, one row group of 50 rows each) and windows (192) that a kill lands with the job under way."""
    return write_inputs(tmp_path_factory.mktemp("ray") / "long", [1200, 1200], row_group_rows=50)


def job_config(model: Path, inputs: Path, output: Path, **options: object) -> RunConfig:
    settings: dict[str, object] = {"rows_per_shard": 40, "read_batch_rows": 16, "batch_size": 4, "device": "cpu"}
    return RunConfig(model_dir=model, input=str(inputs), output=output, text_column="text", id_column="id", **{**settings, **options})  # type: ignore[arg-type]


def local_and_ray(config: RunConfig) -> tuple[JobSummary, JobSummary]:
    local = run_job(replace(config, output=config.output / "local"))
    on_ray = run_job(replace(config, output=config.output / "ray", engine="ray", num_workers=2))
    return local, on_ray


def part_files(output: Path) -> list[Path]:
    return sorted(output.glob("part-*.parquet"))


def assert_close(got: object, expected: object, where: str) -> None:
    if isinstance(expected, float) and isinstance(got, float):
        assert math.isclose(got, expected, rel_tol=0, abs_tol=TOLERANCE), f"{where}: {got} != {expected}"
    elif isinstance(expected, list) and isinstance(got, list):
        assert len(got) == len(expected), f"{where}: {len(got)} values, expected {len(expected)}"
        for index, (a, b) in enumerate(zip(got, expected)):
            assert_close(a, b, f"{where}[{index}]")
    elif isinstance(expected, dict) and isinstance(got, dict):
        assert got.keys() == expected.keys(), where
        for key in expected:
            assert_close(got[key], expected[key], f"{where}.{key}")
    else:
        assert got == expected, f"{where}: {got!r} != {expected!r}"


def assert_same_output(got: Path, expected: Path) -> None:
    """The same part files, rows, ids in order, schema and values (floats within TOLERANCE)."""
    assert [path.name for path in part_files(got)] == [path.name for path in part_files(expected)]
    assert (got / SUCCESS_FILE).is_file()
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in expected.iterdir())
    got_job, expected_job = (json.loads((d / JOB_FILE).read_text()) for d in (got, expected))
    assert got_job["completed"] == expected_job["completed"]
    for got_file, expected_file in zip(part_files(got), part_files(expected)):
        got_table, expected_table = pq.read_table(got_file), pq.read_table(expected_file)
        assert got_table.schema.equals(expected_table.schema, check_metadata=False), got_file.name
        assert got_table.column("id").to_pylist() == expected_table.column("id").to_pylist()
        for name in expected_table.column_names:
            for row, (a, b) in enumerate(zip(got_table.column(name).to_pylist(), expected_table.column(name).to_pylist())):
                assert_close(a, b, f"{got_file.name} row {row} {name}")


@pytest.mark.parametrize("task", ["embed", "classify", "fill-mask"])
def test_ray_output_equals_the_local_engine_row_by_row(
    ray_runtime: None, tmp_path: Path, small_inputs: Path, request: pytest.FixtureRequest, task: str
) -> None:
    export: ExportResult = request.getfixturevalue(f"tiny_{task.replace('-', '_')}_export")
    local, on_ray = local_and_ray(job_config(export.directory, small_inputs, tmp_path))
    assert_same_output(tmp_path / "ray", tmp_path / "local")
    assert (on_ray.rows, on_ray.error_rows, on_ray.tokens, on_ray.truncated_rows) == (local.rows, local.error_rows, local.tokens, local.truncated_rows)
    assert on_ray.rows == 235 and on_ray.error_rows == len(range(0, 235, 29))
    assert (on_ray.shards_written, on_ray.provider) == (local.shards_written, "CPUExecutionProvider on 2 Ray workers")


def test_token_classify_on_ray_is_refused_before_any_work(tmp_path: Path, small_inputs: Path, tiny_token_classify_export: ExportResult) -> None:
    """#11: the Ray engine's token layout has no character offsets, so entities cannot be built there (yet)."""
    from worker.errors import UsageError

    config = replace(job_config(tiny_token_classify_export.directory, small_inputs, tmp_path), engine="ray")
    with pytest.raises(UsageError, match="--engine local only"):
        run_job(config)
    assert not list(tmp_path.glob("*.parquet"))


def test_ray_output_equals_the_local_engine_with_chunking_and_int8(
    ray_runtime: None, tmp_path: Path, small_inputs: Path, tiny_embed_export: ExportResult
) -> None:
    """#12 on Ray: chunk rows go to the actors with their window, ranges are decided once by the driver."""
    options = {"max_length": 8, "chunking": "rows", "chunk_overlap": 2, "embedding_dtype": "int8", "calibration_rows": 30}
    local, on_ray = local_and_ray(job_config(tiny_embed_export.directory, small_inputs, tmp_path, **options))
    assert_same_output(tmp_path / "ray", tmp_path / "local")
    assert (on_ray.rows, on_ray.tokens) == (local.rows, local.tokens) and on_ray.rows == 235
    ranges = [json.loads((tmp_path / name / JOB_FILE).read_text())["embedding_ranges"] for name in ("local", "ray")]
    assert ranges[0] == ranges[1]
    for path in part_files(tmp_path / "ray"):
        assert json.loads(pq.read_schema(path).metadata[b"bertbatch.quantization"])["ranges"] == ranges[0]


def test_mean_chunked_texts_on_ray_equal_the_local_engine(
    ray_runtime: None, tmp_path: Path, small_inputs: Path, tiny_embed_export: ExportResult
) -> None:
    """--chunking: a window's units are chunks, not rows; they travel to the workers with their rows."""
    config = job_config(tiny_embed_export.directory, small_inputs, tmp_path, chunking="mean", max_length=8, chunk_overlap=2)
    local, on_ray = local_and_ray(config)
    assert_same_output(tmp_path / "ray", tmp_path / "local")
    assert (on_ray.rows, on_ray.tokens) == (local.rows, local.tokens)


def test_a_job_finished_by_one_engine_is_complete_for_the_other(
    ray_runtime: None, tmp_path: Path, small_inputs: Path, tiny_embed_export: ExportResult
) -> None:
    """The engine and its workers are not part of the job's identity: same job, same output."""
    config = job_config(tiny_embed_export.directory, small_inputs, tmp_path / "out")
    run_job(config)
    again = run_job(replace(config, engine="ray", num_workers=1))
    assert again.already_complete


def inference_actor_pids() -> set[int]:
    """Ray worker processes that hold an onnxruntime session: the inference actors (read tasks never load it)."""
    pids = set()
    for process in Path("/proc").glob("[0-9]*"):
        try:
            if process.name != str(os.getpid()) and (process / "cmdline").read_bytes().startswith(b"ray::"):
                if "onnxruntime_pybind11_state" in (process / "maps").read_text():
                    pids.add(int(process.name))
        except OSError:  # a process that ended meanwhile
            continue
    return pids


def wait_until(condition: Callable[[], bool], alive: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 120
    while not condition():
        assert alive(), f"the job ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def test_a_killed_actor_is_restarted_and_the_job_completes_correctly(
    ray_runtime: None, tmp_path: Path, long_inputs: Path, tiny_embed_export: ExportResult
) -> None:
    config = job_config(tiny_embed_export.directory, long_inputs, tmp_path)
    run_job(replace(config, output=tmp_path / "local"))
    output = tmp_path / "ray"
    outcome: list[object] = []
    job = threading.Thread(target=lambda: outcome.append(_run_catching(replace(config, output=output, engine="ray"))))
    job.start()
    try:
        wait_until(lambda: len(part_files(output)) >= 2 and len(inference_actor_pids()) == 2, job.is_alive, "two committed shards")
        victim = min(inference_actor_pids())
        os.kill(victim, signal.SIGKILL)
        committed_at_kill = len(part_files(output))
    finally:
        job.join(timeout=300)
    assert not job.is_alive()
    assert isinstance(outcome[0], JobSummary), outcome[0]
    assert committed_at_kill < 48, "the job was over before the kill"
    assert victim not in inference_actor_pids()
    assert outcome[0].shards_written == 48 and outcome[0].shards_skipped == 0
    assert_same_output(output, tmp_path / "local")


def recorded_shards(output: Path) -> dict[str, int]:
    try:
        return json.loads((output / JOB_FILE).read_text())["completed"]  # replaced atomically: never half-written
    except FileNotFoundError:
        return {}


def _run_catching(config: RunConfig) -> object:
    try:
        return run_job(config)
    except BaseException as error:  # handed to the test's thread, which reports it
        return error


def test_a_killed_driver_leaves_committed_shards_and_a_rerun_resumes(
    ray_runtime: None, tmp_path: Path, long_inputs: Path, tiny_embed_export: ExportResult
) -> None:
    config = job_config(tiny_embed_export.directory, long_inputs, tmp_path)
    run_job(replace(config, output=tmp_path / "local"))
    output = tmp_path / "ray"
    # Another driver on the same cluster, through the CLI: --ray-address joins it.
    command = [
        sys.executable, "-m", "worker.cli", "run", "--engine", "ray", "--num-workers", "2",
        "--ray-address", ray.get_runtime_context().gcs_address,
        "--model", str(config.model_dir), "--input", config.input, "--output", str(output),
        "--text-column", "text", "--id-column", "id", "--rows-per-shard", "40", "--batch-size", "4",
        "--device", "cpu", "--log-format", "json",
    ]  # fmt: skip
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: len(recorded_shards(output)) >= 3, lambda: driver.poll() is None, "three recorded shards")
    finally:
        driver.kill()
        _, stderr = driver.communicate()
    assert driver.returncode == -signal.SIGKILL, stderr
    assert not (output / SUCCESS_FILE).exists()
    recorded = recorded_shards(output)
    assert 3 <= len(recorded) < 48, "the job was over before the kill"
    for path in part_files(output):  # whole shards only (a renamed but unrecorded one is redone)
        assert pq.read_table(path).num_rows == 50, path.name

    # read_batch_rows is not a CLI option: the rerun's differs (4096), and only speed depends on it.
    rerun = run_job(replace(config, output=output, engine="ray", read_batch_rows=4096))
    assert rerun.shards_skipped == len(recorded) and rerun.shards_written == 48 - len(recorded)
    assert_same_output(output, tmp_path / "local")


def test_too_many_errors_stops_the_ray_job_and_a_rerun_completes_it(
    ray_runtime: None, tmp_path: Path, small_inputs: Path, tiny_embed_export: ExportResult
) -> None:
    """Leaving mid-job from the driver's side stops the pipeline; the runtime stays usable."""
    config = job_config(tiny_embed_export.directory, small_inputs, tmp_path)
    run_job(replace(config, output=tmp_path / "local"))
    output = tmp_path / "ray"
    # Null texts are rows 0, 29, 58 and 87: the fourth error comes in the third shard.
    with pytest.raises(TooManyErrors, match="4 rows failed, more than --max-errors 3; 2 finished shards are kept"):
        run_job(replace(config, output=output, engine="ray", max_errors=3))
    assert [path.name for path in part_files(output)] == ["part-00000-00000.parquet", "part-00000-00001.parquet"]
    run_job(replace(config, output=output, engine="ray"))
    assert_same_output(output, tmp_path / "local")


def test_a_node_that_cannot_see_the_model_fails_with_the_model_error(
    ray_runtime: None, tmp_path: Path, small_inputs: Path, tiny_embed_export: ExportResult
) -> None:
    """The actors' own error comes back, not a Ray wrapper (the CLI maps it to exit code 4)."""
    config = job_config(tiny_embed_export.directory, small_inputs, tmp_path / "out", engine="ray")
    model_dir = open_model_dir(tiny_embed_export.directory)
    files = inspect_inputs(sorted(small_inputs.glob("*.parquet")), "text", None, "id")
    unseen = ModelDir(tmp_path / "not-on-this-node", model_dir.manifest)
    with pytest.raises(ModelDirError, match="not-on-this-node"):
        with write_on_ray(config, CheckedJob(unseen, 128, files), plan_shards(files, 40)) as (_, records):
            list(records)


def test_resources_the_cluster_lacks_are_refused_before_running(
    ray_runtime: None, tmp_path: Path, small_inputs: Path, tiny_embed_export: ExportResult
) -> None:
    config = job_config(tiny_embed_export.directory, small_inputs, tmp_path / "out", engine="ray")
    with pytest.raises(UsageError, match="4 CPUs: 4 workers x 1 CPUs leave none"):
        run_job(replace(config, num_workers=4))
    with pytest.raises(DeviceUnavailable, match="needs 2 GPUs; the Ray cluster has 0"):
        run_job(replace(config, device="auto", gpus_per_worker=1))
    with pytest.raises(DeviceUnavailable, match="no GPUs"):
        run_job(replace(config, device="cuda"))
    assert not part_files(tmp_path / "out")


def test_ray_options_are_checked_without_a_cluster(tmp_path: Path, small_inputs: Path, tiny_embed_export: ExportResult) -> None:
    config = job_config(tiny_embed_export.directory, small_inputs, tmp_path / "out")
    with pytest.raises(UsageError, match="--num-workers must be at least 1"):
        run_job(replace(config, engine="ray", num_workers=0))
    with pytest.raises(UsageError, match="--gpus-per-worker 1 with --device cpu"):
        run_job(replace(config, engine="ray", gpus_per_worker=1))
    with pytest.raises(UsageError, match="apply to --engine ray"):
        run_job(replace(config, ray_address="auto"))


def test_the_cli_imports_no_ray() -> None:
    code = "import sys, worker.cli, worker.job; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- Multi-node faults: workers write shards, the driver commits (worker.commit) --------------------


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def node_of(pid: int, cluster: Cluster) -> Any:
    """The worker node whose raylet started process ``pid`` (a Ray worker process is its raylet's child)."""
    raylets = {node.all_processes["raylet"][0].process.pid: node for node in cluster.worker_nodes}
    while pid > 1 and pid not in raylets:
        pid = parent_of(pid)
    assert pid in raylets, "the process runs on no worker node"
    return raylets[pid]


def open_attempts(output: Path) -> dict[int, Path]:
    """Inference actors that have a shard's attempt file open (are writing it): pid -> attempt file."""
    writing = {}
    for pid in inference_actor_pids():
        try:
            for descriptor in Path(f"/proc/{pid}/fd").iterdir():
                target = Path(os.readlink(descriptor))
                if target.parent == output and target.name.startswith(".part-") and ".tmp-" in target.name:
                    writing[pid] = target
        except OSError:  # the process or the descriptor is gone meanwhile
            continue
    return writing


def test_a_lost_node_is_survived_and_the_output_equals_the_local_engine(
    ray_cluster: Cluster, ray_runtime: None, tmp_path: Path, long_inputs: Path, tiny_embed_export: ExportResult
) -> None:
    """The node holding the inference actor loses its raylet (and every process on it) mid-job."""
    config = job_config(tiny_embed_export.directory, long_inputs, tmp_path)
    run_job(replace(config, output=tmp_path / "local"))
    output = tmp_path / "ray"
    outcome: list[object] = []
    # One actor, so the other node can take it over (an actor and a reading task on its two CPUs).
    job = threading.Thread(target=lambda: outcome.append(_run_catching(replace(config, output=output, engine="ray", num_workers=1))))
    job.start()
    try:
        wait_until(lambda: len(recorded_shards(output)) >= 2 and len(inference_actor_pids()) == 1, job.is_alive, "two recorded shards")
        lost = node_of(min(inference_actor_pids()), ray_cluster)
        ray_cluster.remove_node(lost, allow_graceful=False)
        recorded_at_loss = len(recorded_shards(output))
        job.join(timeout=300)
    finally:
        if len(ray_cluster.worker_nodes) < 2:  # the other tests' cluster: two worker nodes
            ray_cluster.add_node(num_cpus=NODE_CPUS, object_store_memory=OBJECT_STORE)
            ray_cluster.wait_for_nodes()
    assert not job.is_alive()
    assert isinstance(outcome[0], JobSummary), outcome[0]
    assert recorded_at_loss < 48, "the job was over before the node was lost"
    assert outcome[0].shards_written == 48
    assert_same_output(output, tmp_path / "local")


def test_an_actor_killed_while_it_writes_leaves_no_partial_and_no_duplicate_shard(
    ray_runtime: None, tmp_path: Path, long_inputs: Path, tiny_embed_export: ExportResult
) -> None:
    config = job_config(tiny_embed_export.directory, long_inputs, tmp_path)
    run_job(replace(config, output=tmp_path / "local"))
    output = tmp_path / "ray"
    outcome: list[object] = []
    job = threading.Thread(target=lambda: outcome.append(_run_catching(replace(config, output=output, engine="ray"))))
    job.start()
    try:
        writing: dict[int, Path] = {}

        def writing_a_shard() -> bool:
            writing.update(open_attempts(output) if len(recorded_shards(output)) >= 2 else {})
            return bool(writing)

        wait_until(writing_a_shard, job.is_alive, "an actor writing a shard")
        victim, attempt = next(iter(writing.items()))
        os.kill(victim, signal.SIGKILL)
        shard = attempt.name[1:].split(".tmp-")[0]
        recorded_at_kill = recorded_shards(output)
    finally:
        job.join(timeout=300)
    assert not job.is_alive()
    assert isinstance(outcome[0], JobSummary), outcome[0]
    assert shard not in recorded_at_kill and len(recorded_at_kill) < 48
    assert not attempt.exists(), "the killed attempt's file is removed, never committed"
    assert recorded_shards(output)[shard] == 50
    assert_same_output(output, tmp_path / "local")  # the same files, hidden ones included: one copy of each shard


def driver_costs(address: str, model: Path, inputs: Path, output: Path) -> dict[str, Any]:
    """A driver process (benchmarks/ray_driver.py, as the BENCHMARKS.md row) runs the job and reports its own costs."""
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "ray_driver.py"
    command = [sys.executable, str(script), "--rows-per-shard", "500", "--num-workers", "2", "--measure-driver", address, str(model), str(inputs), str(output)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_wide_rows_never_reach_the_driver(ray_runtime: None, tmp_path: Path, tiny_embed_export: ExportResult) -> None:
    """50 KB passthrough rows: the driver receives a few hundred bytes per shard, and its peak RSS
    stays flat from 300 to 3000 rows (15 MB to 150 MB of rows; shards of whole 1000-row groups)."""
    from benchmarks.ray_driver import write_wide_inputs

    address = ray.get_runtime_context().gcs_address
    costs = {}
    for rows in (300, 3000):
        inputs = write_wide_inputs(tmp_path / f"wide-{rows}.parquet", rows, row_bytes=50_000)
        costs[rows] = driver_costs(address, tiny_embed_export.directory, inputs, tmp_path / f"out-{rows}")
        written = pq.read_table(tmp_path / f"out-{rows}")
        assert written.num_rows == rows and written.column("blob")[rows - 1].as_py()[:8] == (rows - 1).to_bytes(8, "little")
    small, large = costs[300], costs[3000]
    assert (small["shards"], large["shards"]) == (1, 3)
    for cost in (small, large):
        assert cost["bytes_received_per_shard"] < 4096, cost
    assert large["driver_peak_rss_mb"] - small["driver_peak_rss_mb"] < 64, costs
