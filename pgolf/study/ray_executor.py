"""`pgolf ablate --executor ray`: the same stage jobs as Ray tasks on an existing Ray cluster.

The scheduler (`pgolf.study.scheduler`) stays the one place that decides which job runs when and records
what finished; this module only runs a `Job` elsewhere: `execute_job` inside a Ray task holding one GPU
where the cluster has GPUs, or a fixed share of CPU threads otherwise. A task whose worker dies (killed,
out of memory, its node lost) is retried by Ray up to `MAX_RETRIES` times; a retry whose stage already
reached the cache returns at once, so nothing finished is computed twice.

Every node must run the same pgolf, torch and techniques and reach the same data (`--data` at one path on
every node, or the embedded corpus that each node builds the same way): the stage keys are computed on the
driver, so each node is probed before the study starts and each task checks again before it runs.

The ablation directory (`--out`: the stage cache, logs, run records) must be at the same path on storage
that every node mounts. What the cache (`pgolf.study.cache`) needs from that shared filesystem:

- `rename(2)` of a directory is atomic and seen by every node: an entry appears whole or not at all, and
  renaming onto an existing, non-empty entry fails (the cache then keeps whichever entry verifies);
- close-to-open consistency: files written and closed on one node read back whole on another node that
  opens them after seeing the rename (the entry's checksums catch anything else: such an entry is moved
  aside and recomputed, never used);
- a new entry becomes visible to the driver soon after the job that wrote it returns: the driver waits up
  to `VISIBLE_WAIT_S` for it. On NFS mount with `lookupcache=positive` (or `none`): by default a failed
  lookup is cached for up to `acdirmax` seconds;
- `flock(2)` locks that hold across nodes (NFSv4, or NFSv3 with lockd): the lock that allows one
  `pgolf ablate` per directory, and the one that serialises building the embedded corpus when nodes share
  `PGOLF_CACHE_DIR`. Node-local locks would let two drivers on two machines run the same directory;
- temporary names unique across nodes: the cache's include the writer's pid and a random suffix.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pgolf.errors import ConfigError
from pgolf.study.jobs import Job, JobLost, Log, execute_job
from pgolf.study.plan import Plan

MAX_RETRIES = 3  # Ray re-runs a task whose worker died this many times before the job counts as failed
CONNECT_TIMEOUT_S = 5.0  # ray.init retries an unreachable address forever: a plain connect is tried first
PROBE_TIMEOUT_S = 300.0  # every node answers this soon (a probe waits for a free GPU like a job does)
VISIBLE_WAIT_S = 30.0  # how long a finished job's cache entry may take to show on the driver
INSTALL_HINT = 'Install it here and on every node: pip install "pgolf[ray]" (ray>=2.9).'


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs the ray package, which is not installed", key="executor",
                          hint=INSTALL_HINT) from None
    return ray


def _host_port(address: str) -> tuple[str, int] | None:
    """HOST:PORT (optionally ray://HOST:PORT) as a pair; None for 'auto' and other forms ray resolves itself."""
    bare = address.split("://", 1)[-1]
    host, sep, port = bare.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def check_reachable(address: str) -> None:
    """Refuse an address nothing listens on (ray.init would retry it without end)."""
    target = _host_port(address)
    if target is None:
        return
    try:
        socket.create_connection(target, timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ConfigError(f"cannot reach the Ray cluster at {address} ({exc.strerror or type(exc).__name__})",
                          key="address", hint="Start one with `ray start --head --port PORT` (and "
                          "`ray start --address HEAD:PORT` on each other node), or pass --address HOST:PORT "
                          "of its head node.") from None


# - what each job holds -


@dataclass(frozen=True)
class JobShape:
    """The resources each job's task asks for, the torch threads it runs on and how many run at once."""

    gpus: int
    cpus: int
    slots: int

    @property
    def threads(self) -> int:
        return max(1, self.cpus)

    def describe(self) -> str:
        held = f"1 GPU and {self.cpus} CPU(s)" if self.gpus else f"{self.cpus} CPU thread(s)"
        return f"{self.slots} job(s) at a time, each holding {held}"


def job_shape(nodes: list[dict[str, float]], workers: int | None) -> JobShape:
    """One GPU per job where the cluster has GPUs; otherwise the CPUs of the smallest node (every node
    fits a job), or the cluster's CPUs divided by `workers` when that is smaller. `workers` also caps
    the jobs in flight."""
    gpu_nodes = [n for n in nodes if n.get("GPU", 0) >= 1]
    if gpu_nodes:
        cpus = min(int(n.get("CPU", 0)) // int(n["GPU"]) for n in gpu_nodes)
        slots = sum(int(n["GPU"]) for n in gpu_nodes)
        return JobShape(1, cpus, min(slots, workers) if workers else slots)
    cores = [int(n.get("CPU", 0)) for n in nodes if n.get("CPU", 0) >= 1]
    if not cores:
        raise ConfigError("the Ray cluster has no CPUs or GPUs to run jobs on", key="address",
                          hint="Start its nodes with CPUs (ray start --num-cpus N) or GPUs.")
    cpus = min(cores) if workers is None else max(1, min(min(cores), sum(cores) // workers))
    slots = sum(c // cpus for c in cores)
    return JobShape(0, cpus, min(slots, workers) if workers else slots)


# - the code that runs on the nodes -


def node_environment() -> dict[str, Any]:
    """What the stage keys say about the machine that makes an output (see `stage_key_material`)."""
    import torch

    import pgolf
    from pgolf.runtime import device_kind
    from pgolf.study.cache import pgolf_source_hash

    return {"device": device_kind(), "torch": torch.__version__,
            "pgolf": {"version": pgolf.__version__, "source": pgolf_source_hash()}}


def _probe_node(marker: str | None) -> dict[str, Any]:
    """A node's environment, and whether it sees the driver's marker file in the ablation directory."""
    return {"node": socket.gethostname(), "environment": node_environment(),
            "sees_out": None if marker is None else Path(marker).is_file()}


def planned_environment(plan: Plan) -> dict[str, Any]:
    """The environment the plan's training keys name (the same for every run of a plan)."""
    material = next(run.material["train"] for run in plan.runs if run.material is not None)
    return {k: material[k] for k in ("device", "torch", "pgolf")}


def environment_problem(expected: dict[str, Any]) -> str | None:
    """Why this node cannot make outputs under the plan's keys, or None."""
    found = node_environment()
    differs = [f"{k} {found[k]!r} (the plan's: {expected[k]!r})" for k in expected if found.get(k) != expected[k]]
    if not differs:
        return None
    return (f"node {socket.gethostname()} cannot make these outputs: its " + "; ".join(differs)
            + ". Every node needs the same pgolf, torch and device kind as the plan's keys.")


def _run_on_node(job: Job, expected: dict[str, Any], threads: int) -> dict[str, Any]:
    """A Ray task: check the node, then `execute_job` (which records its own failures in the cache)."""
    import torch

    from pgolf.study.cache import StageCache

    torch.set_num_threads(threads)
    problem = environment_problem(expected)
    if problem is not None:  # the node's setup, not the job, is wrong: nothing is recorded in the cache
        return {"ok": False, "error": problem, "seconds": 0.0}
    if StageCache(Path(job.cache_root)).done(job.stage, job.key):  # an earlier attempt finished it, then died
        return {"ok": True, "seconds": None}
    return execute_job(job)


# - the driver side -


class RayCluster:
    """A connection to a running Ray cluster: its nodes, the shape of a job, the device the jobs train on."""

    def __init__(self, address: str | None, workers: int | None, log: Log) -> None:
        ray = import_ray()
        self.ray, self.log = ray, log
        self.address = address or os.environ.get("RAY_ADDRESS") or "auto"
        check_reachable(self.address)
        try:
            ray.init(address=self.address, log_to_driver=False, logging_level=logging.WARNING,
                     configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"cannot connect to the Ray cluster at {self.address}: {exc}", key="address",
                              hint="Pass --address HOST:PORT of a running cluster's head node "
                              "(`ray status` on it shows the cluster).") from None
        try:
            self.nodes = [n for n in ray.nodes() if n.get("Alive")]
            self.shape = job_shape([n["Resources"] for n in self.nodes], workers)
            self.device_kind = self._probe(None)["device"]
        except BaseException:
            ray.shutdown()
            raise
        log(f"ray: {len(self.nodes)} node(s) at {self.address}, {self.device_kind}; {self.shape.describe()}")

    def _probe(self, marker: str | None) -> dict[str, Any]:
        """Ask every node that can run a job for its environment; all must agree (and see `marker`)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        probe = self.ray.remote(_probe_node)
        fits = [n for n in self.nodes if n["Resources"].get("GPU" if self.shape.gpus else "CPU", 0)
                >= max(1, self.shape.gpus or self.shape.cpus)]
        refs = [probe.options(num_cpus=0, num_gpus=self.shape.gpus, max_retries=0, scheduling_strategy=
                              NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(marker) for n in fits]
        try:
            facts = self.ray.get(refs, timeout=PROBE_TIMEOUT_S)
        except self.ray.exceptions.GetTimeoutError:
            raise ConfigError(f"the Ray cluster's nodes did not answer within {PROBE_TIMEOUT_S:.0f} s",
                              key="address", hint="Are its GPUs busy with other work?") from None
        except self.ray.exceptions.RayError as exc:  # e.g. a node without pgolf installed
            raise ConfigError(f"a node of the Ray cluster could not be asked for its environment: "
                              f"{_last_line(exc)}", key="address", hint=INSTALL_HINT) from None
        blind = [f["node"] for f in facts if f["sees_out"] is False]
        if blind:
            raise ConfigError(f"node(s) {', '.join(blind)} do not see the ablation directory {Path(marker).parent}",
                              key="out", hint="Put --out on storage every node mounts at the same path.")
        kinds = {repr(f["environment"]): f for f in facts}
        if len(kinds) > 1:
            listed = "; ".join(f"{f['node']}: {f['environment']}" for f in kinds.values())
            raise ConfigError(f"the Ray cluster's nodes differ in what enters the stage keys ({listed})",
                              key="address", hint="Install the same pgolf and torch on every node, with the "
                              "same kind of device.")
        return facts[0]["environment"]

    def executor(self, out: Path, plan: Plan) -> RayExecutor:
        """Check that every node sees `out`, then run the plan's jobs there (each checking its node first)."""
        marker = out / f".ray-probe-{uuid.uuid4().hex[:8]}"
        marker.write_text("pgolf ablate: every node must see this file\n", encoding="utf-8")
        try:
            self._probe(str(marker))
        finally:
            marker.unlink(missing_ok=True)
        return RayExecutor(self, planned_environment(plan))

    def disconnect(self) -> None:
        self.ray.shutdown()


class RayExecutor:
    """Submits jobs as Ray tasks; each returns a future of `execute_job`'s outcome, or raises `JobLost`
    once Ray has given up on a job whose worker kept dying."""

    def __init__(self, cluster: RayCluster, expected: dict[str, Any]) -> None:
        self.ray, self.shape, self.expected = cluster.ray, cluster.shape, expected
        self.slots = self.shape.slots
        self.remote = self.ray.remote(_run_on_node).options(num_cpus=self.shape.cpus, num_gpus=self.shape.gpus,
                                                            max_retries=MAX_RETRIES, retry_exceptions=False)
        self.refs: dict[cf.Future, Any] = {}

    def submit(self, job: Job) -> cf.Future:
        ref = self.remote.remote(job, self.expected, self.shape.threads)
        outcome: cf.Future = cf.Future()
        self.refs[outcome] = ref
        ref.future().add_done_callback(lambda done: self._settle(job, done, outcome))
        return outcome

    def _settle(self, job: Job, done: cf.Future, outcome: cf.Future) -> None:
        self.refs.pop(outcome, None)
        exc = done.exception()
        if exc is None:
            result = done.result()
            if result["ok"] and not _appears(Path(job.cache_root) / job.stage / job.key):
                result = {"ok": False, "seconds": result["seconds"] or 0.0,
                          "error": f"the job finished on its node but its output is not visible here after "
                                   f"{VISIBLE_WAIT_S:.0f} s: is the ablation directory on storage every node "
                                   "shares, at the same path?"}
            outcome.set_result(result)
        elif isinstance(exc, self.ray.exceptions.RayTaskError):  # the task itself raised: a broken node setup
            outcome.set_result({"ok": False, "seconds": 0.0, "error": f"on Ray: {_last_line(exc)}"})
        elif isinstance(exc, self.ray.exceptions.TaskCancelledError):  # by close(): nobody waits for it
            outcome.set_exception(exc)
        else:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            outcome.set_exception(JobLost(f"its Ray worker died {MAX_RETRIES + 1} times (killed, out of memory, "
                                          f"or its node left the cluster): {first}"))

    def restart(self) -> None:
        """Ray replaces dead workers itself."""

    def close(self) -> None:
        """Cancel the tasks still running (an interrupted study); finished ones are in the cache."""
        for ref in list(self.refs.values()):
            try:
                self.ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - already finished, or its node is gone
                pass
        self.refs.clear()


def _last_line(exc: BaseException) -> str:
    """A remote exception's own message (Ray prefixes it with the remote traceback)."""
    lines = str(exc).strip().splitlines()
    return lines[-1] if lines else type(exc).__name__


def _appears(entry: Path) -> bool:
    """Wait for a cache entry another node wrote (listing the parent refreshes a network filesystem's view)."""
    deadline = time.monotonic() + VISIBLE_WAIT_S
    while True:
        try:
            os.listdir(entry.parent)
        except OSError:
            pass
        if entry.is_dir() or time.monotonic() > deadline:
            return entry.is_dir()
        time.sleep(0.2)
