"""`pgolf ablate --executor ray` on a real two-node Ray cluster started here: the same jobs, the same records and
the same scores as the local executor; a killed worker node's job is retried, a killed driver resumes.

The cluster's processes run in two sessions of their own (one per `ray start`) and are killed by session in
teardown, so none outlives the tests even when one fails. (`ray stop` would also stop every other Ray
cluster this user runs on the machine.)
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pgolf.cli import app
from pgolf.study.ray_executor import JobShape, job_shape
from pgolf.study.scheduler import run_ablation
from tests.conftest import MICRO, REPO, pinned_threads
from tests.test_ablate import STRIDE, by_arm_seed, micro_spec, silent, write_recipe

HAS_RAY = importlib.util.find_spec("ray") is not None


def needs_cluster(test):
    """Trains on a local two-node Ray cluster: slow, and only where ray is installed (Linux: reads /proc)."""
    for mark in (pytest.mark.slow,
                 pytest.mark.skipif(not HAS_RAY, reason="ray is not installed (pip install -e '.[ray]')"),
                 pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find its processes")):
        test = mark(test)
    return test


STAGE_JOBS = {"train": 2, "export": 2, "eval": 4}  # STRIDE toggled over seeds 1, 2: the two arms share each model


# --- what each job holds (no cluster) --------------------------------------------------------------------


def test_a_job_holds_one_gpu_where_there_are_gpus_else_a_share_of_cpu_threads():
    gpus = [{"CPU": 32.0, "GPU": 8.0}, {"CPU": 16.0, "GPU": 8.0}, {"CPU": 4.0}]  # a CPU-only node runs no job
    assert job_shape(gpus, None) == JobShape(gpus=1, cpus=2, slots=16)
    assert job_shape(gpus, 4).slots == 4
    cpus = [{"CPU": 8.0}, {"CPU": 4.0}, {"CPU": 0.0, "memory": 1e9}]  # a head node started with --num-cpus 0
    assert job_shape(cpus, None) == JobShape(gpus=0, cpus=4, slots=3)  # the smallest node fits one job
    assert job_shape(cpus, 6) == JobShape(gpus=0, cpus=2, slots=6)  # 12 CPUs divided by 6 workers
    assert job_shape([{"CPU": 1.0}, {"CPU": 1.0}], None) == JobShape(gpus=0, cpus=1, slots=2)


def test_an_unreachable_cluster_or_a_missing_ray_is_one_clear_error(tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path)
    command = ["ablate", str(recipe), "--toggle", STRIDE, "--seeds", "1", "--scale", "tiny", "--executor", "ray",
               "--out", str(tmp_path / "ablation"), *[flag for item in MICRO for flag in ("--set", item)]]
    if HAS_RAY:
        with socket.socket() as s:  # a port nothing listens on
            s.bind(("127.0.0.1", 0))
            closed = f"127.0.0.1:{s.getsockname()[1]}"
        for extra in ([], ["--plan"]):
            result = CliRunner().invoke(app, [*command, "--address", closed, *extra])
            assert result.exit_code == 2 and "cannot reach the Ray cluster" in result.stderr, result.output
            assert "Traceback" not in result.output
    monkeypatch.setitem(sys.modules, "ray", None)  # as if it were not installed
    for extra in ([], ["--plan"]):
        result = CliRunner().invoke(app, [*command, *extra])
        assert result.exit_code == 2 and 'pip install "pgolf[ray]"' in result.stderr, result.output
    assert not (tmp_path / "ablation").exists()


# --- a two-node cluster ------------------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def session_pids(sid: int) -> list[int]:
    """Live processes of a session (zombies excluded)."""
    out = []
    for entry in Path("/proc").glob("[0-9]*"):
        fields = _stat(int(entry.name))
        if fields and fields[0] != "Z" and int(fields[3]) == sid:
            out.append(int(entry.name))
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class LocalCluster:
    """A head node and a worker node of one CPU each, every process in its node's own session."""

    def __init__(self) -> None:
        self.temp = tempfile.mkdtemp(prefix="pgray-")  # short: Ray's socket paths must fit 107 bytes
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.ray = str(Path(sys.executable).with_name("ray") if Path(sys.executable).with_name("ray").exists()
                       else shutil.which("ray"))
        # workers import the test techniques; a killed node is declared dead within about a second
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_health_check_initial_delay_ms": "0", "RAY_health_check_period_ms": "500",
                    "RAY_health_check_timeout_ms": "500", "RAY_health_check_failure_threshold": "2"}
        self.sessions: list[int] = []
        self.head = self._start("--head", f"--port={self.port}", "--include-dashboard=false", f"--temp-dir={self.temp}")
        self.worker = self.add_worker()

    def _start(self, *args: str) -> int:
        proc = subprocess.Popen([self.ray, "start", *args, "--num-cpus=1", "--disable-usage-stats",
                                 "--node-ip-address=127.0.0.1"], env=self.env, start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.sessions.append(proc.pid)  # the node's processes keep this session id after `ray start` exits
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, output
        return proc.pid

    def add_worker(self) -> int:
        return self._start(f"--address={self.address}")

    def kill_node(self, sid: int) -> None:
        deadline = time.monotonic() + 30
        while (pids := session_pids(sid)) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.1)
        assert not session_pids(sid), f"processes of session {sid} survived SIGKILL"

    def running_jobs(self) -> list[int]:
        return [pid for sid in self.sessions for pid in session_pids(sid) if "_run_on_node" in cmdline(pid)]

    def stop(self) -> None:
        for sid in self.sessions:
            self.kill_node(sid)
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    if not HAS_RAY:
        pytest.skip("ray is not installed")
    made = None
    try:
        made = LocalCluster()
        yield made
    finally:
        if made is not None:
            made.stop()


@pytest.fixture
def two_nodes(cluster):
    """The cluster with its worker node alive (a test before may have killed it)."""
    if not session_pids(cluster.worker):
        cluster.worker = cluster.add_worker()
    return cluster


def ablate_command(tmp_path: Path, cluster: LocalCluster, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pgolf", "ablate", str(write_recipe(tmp_path)), "--toggle", STRIDE,
            "--seeds", "1,2", "--scale", "tiny", "--executor", "ray", "--address", cluster.address,
            "--out", str(out), "--format", "json", *[flag for item in MICRO for flag in ("--set", item)], *extra]


def driver_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def finished_entries(out: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in (out / "cache").glob("*/*") if p.is_dir() and not p.name.startswith(".")}


def job_headers(log: Path) -> list[str]:
    """The line each start of a job writes into its log (`execute_job`): '== STAGE KEY for RUN (pid N)'."""
    lines = log.read_text().splitlines() if log.is_file() else []
    return [line for line in lines if line.startswith("== ") and line.endswith(")") and " (pid " in line]


@needs_cluster
def test_a_study_on_ray_trains_each_model_once_and_scores_as_the_local_executor(two_nodes, tmp_path):
    out = tmp_path / "ray"
    command = ablate_command(tmp_path, two_nodes, out)
    plan = subprocess.run([*command, "--plan"], cwd=tmp_path, env=driver_env(), capture_output=True, text=True,
                          timeout=300)
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["to_run"] == STAGE_JOBS
    assert not out.exists()  # planning runs and creates nothing

    done = subprocess.run(command, cwd=tmp_path, env=driver_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "2 node(s)" in done.stderr and "2 job(s) at a time" in done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {s: {"ran": n, "reused": 4 - n} for s, n in STAGE_JOBS.items()}
    logs = list((out / "logs").glob("*.log"))
    assert len(logs) == sum(STAGE_JOBS.values()) and all(len(job_headers(log)) == 1 for log in logs)  # each ran once
    seconds = json.loads((out / "job_seconds.json").read_text())
    assert {stage: len(seconds[stage]) for stage in STAGE_JOBS} == STAGE_JOBS  # every finished job's wall time
    assert len(list((out / "runs").glob("*.json"))) == 4

    with pinned_threads():  # the tasks ran on one thread each (one CPU per node)
        _, local = run_ablation(micro_spec(tmp_path, [STRIDE], seeds=(1, 2)), tmp_path / "local", log=silent)
    assert local["counts"] == summary["counts"]
    local_seconds = json.loads((tmp_path / "local" / "job_seconds.json").read_text())
    assert {s: set(seconds[s]) for s in STAGE_JOBS} == {s: set(local_seconds[s]) for s in STAGE_JOBS}
    ray_runs, local_runs = by_arm_seed(summary), by_arm_seed(local)
    assert ray_runs.keys() == local_runs.keys()
    for run, record in ray_runs.items():
        assert record["status"] == "ok" and record["keys"] == local_runs[run]["keys"]
        assert record["stages"] == local_runs[run]["stages"]
        assert record["result"]["val_bpb"] == local_runs[run]["result"]["val_bpb"], run


def running_on(sid: int, out: Path) -> Path | None:
    """The log of a job running now in session `sid` whose output is not finished yet."""
    for log in (out / "logs").glob("*.log"):
        stage, key = log.stem.split("-", 1)
        for header in job_headers(log):
            fields = _stat(int(header.rsplit("pid ", 1)[1].rstrip(")")))
            if fields and fields[0] != "Z" and int(fields[3]) == sid and not (out / "cache" / stage / key).is_dir():
                return log
    return None


@needs_cluster
def test_a_job_on_a_killed_worker_node_is_retried_and_nothing_finished_is_lost(two_nodes, tmp_path):
    out = tmp_path / "ray"
    proc = subprocess.Popen(ablate_command(tmp_path, two_nodes, out), cwd=tmp_path, env=driver_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (finished_entries(out) and (victim := running_on(two_nodes.worker, out))):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "no job ran on the worker node after a first output in time"
            time.sleep(0.05)
        finished = finished_entries(out)
        two_nodes.kill_node(two_nodes.worker)
        _, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    assert {p: finished_entries(out).get(p) for p in finished} == finished  # nothing finished was redone
    assert len(job_headers(victim)) == 2, victim.read_text()  # started on the killed node, then retried
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {s: {"ran": n, "reused": 4 - n} for s, n in STAGE_JOBS.items()}
    assert all(r["status"] == "ok" for r in summary["runs"])


@needs_cluster
def test_a_killed_driver_resumes_without_recomputing(two_nodes, tmp_path):
    out = tmp_path / "ray"
    command = ablate_command(tmp_path, two_nodes, out)
    proc = subprocess.Popen(command, cwd=tmp_path, env=driver_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not any(p.parent.name == "eval" for p in finished_entries(out)):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "no run finished in time"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.communicate()
    deadline = time.monotonic() + 60
    while two_nodes.running_jobs():  # Ray ends the dead driver's tasks
        assert time.monotonic() < deadline, "the killed driver's tasks kept running"
        time.sleep(0.2)
    finished = finished_entries(out)
    assert 0 < sum(p.parent.name == "eval" for p in finished) < STAGE_JOBS["eval"]

    again = subprocess.run(command, cwd=tmp_path, env=driver_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    summary = json.loads((out / "summary.json").read_text())
    for stage, total in STAGE_JOBS.items():
        assert summary["counts"][stage]["ran"] == total - sum(p.parent.name == stage for p in finished)
    assert {p: finished_entries(out).get(p) for p in finished} == finished
    assert all(r["status"] == "ok" for r in summary["runs"]) and len(summary["runs"]) == 4
    assert not list((out / "cache").glob("*/.tmp-*"))  # the interrupted writes were cleaned up
