"""`pgolf doctor`: check a machine before money is spent on it, and say what to fix.

Participants lost paid pod time to environments that were wrong in ways a minute of checking
would have shown: a CPU build of torch on a GPU pod, the records' FlashAttention 3 missing from
the RunPod image (issue #280), NCCL variables copied from one pod to another, truncated or
mis-staged shards (a 9,662,464-token validation split, 143 or 1499 training shards where 80
were meant), data re-downloads on a full disk. Each check here looks at one of those and
reports ok / warn / fail with a one-line fix; warnings never fail the command.

Every check is independent: it reads what it needs itself, and an exception inside one check
becomes that check's failure with the message, so a machine without CUDA, without data, or
with a broken variable still gets a full report. Facts about the challenge (shard counts,
validation token counts, what an NCCL variable does) name their source next to the constant.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import platform
import re
import shutil
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from pgolf.data import shards
from pgolf.data.challenge import FULL_TRAIN_SHARDS, VAL_REFERENCES, is_challenge_export, known_bad_val
from pgolf.errors import DataError

OK, WARN, FAIL = "ok", "warn", "fail"
STATUS_STYLE = {OK: "green", WARN: "yellow", FAIL: "bold red"}


@dataclass
class Finding:
    """One row of the report: what was found and, unless it is fine, what to do about it."""

    check: str
    status: str
    found: str
    fix: str = ""
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DoctorInputs:
    """What the checks look at besides the machine itself (the CLI passes os.environ)."""

    data: Path | None = None
    tokenizer: Path | None = None
    environ: Mapping[str, str] = field(default_factory=dict)
    runs_dir: Path = Path("runs")  # where `pgolf run` writes by default
    fetch_dir: Path = Path("data")  # where `pgolf data fineweb` writes by default


Check = Callable[[DoctorInputs], Finding | list[Finding] | None]


# --- the challenge's figures ------------------------------------------------------------------------

CHALLENGE_GPUS = 8  # "Reproducibly run in under 10 minutes on 8xH100s" (challenge README; records: 8xH100 80GB SXM)
# The baseline's 600 s: "stopping_early: wallclock_cap ... step:13780/20000" at 524,288 tokens per step
# (records/track_10min_16mb/2026-03-17_NaiveBaseline/train.log): 7.22B tokens, into a 73rd shard.
BASELINE_SHARDS_READ = -(-13_780 * 524_288 // shards.SHARD_TOKENS)
SHARD_BYTES = shards.HEADER_BYTES + 2 * shards.SHARD_TOKENS  # 200,001,024 bytes per full training shard
# "Serialized model: 135417533 bytes" (records/track_10min_16mb/2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_
# 9HpStack_1.0611/train_seed42.log): the final checkpoint of a record-sized model.
RECORD_CHECKPOINT_BYTES = 135_417_533
RUNS_TO_KEEP = 12  # the README's `--toggle ttt,ppm --seeds 42,314,999`: 4 factorial arms x 3 seeds
# Every rank holds the validation stream as int64 tokens and int32 byte counts (pgolf.data.dataset);
# sp1024's is the largest of the challenge's validation sets.
VAL_STREAM_BYTES_PER_TOKEN = 8 + 4
SHM_ADVISED_BYTES = 2 * 1024**3  # PyTorch's CI gave its containers --shm-size=2gb after crashes in NCCL's shm setup


LARGEST_VAL_TOKENS = max(r.targets + r.window for r in VAL_REFERENCES)  # sp1024's, at most


# --- running and reporting ----------------------------------------------------------------------------


def run_checks(inputs: DoctorInputs, checks: Sequence[tuple[str, Check]] | None = None,
               reraise: bool = False) -> list[Finding]:
    """Run every check; one that raises becomes its own failure (unless `reraise`, for --debug)."""
    findings: list[Finding] = []
    for name, check in CHECKS if checks is None else checks:
        try:
            outcome = check(inputs)
        except Exception as exc:
            if reraise:
                raise
            outcome = Finding(name, FAIL, f"the check itself failed: {type(exc).__name__}: {exc}",
                              "rerun with --debug for the traceback; the other checks are unaffected")
        if outcome is None:
            continue
        findings.extend(outcome if isinstance(outcome, list) else [outcome])
    return findings


def exit_code(findings: Sequence[Finding]) -> int:
    """1 when any check fails, else 0: warnings are advice, not failures."""
    return 1 if any(f.status == FAIL for f in findings) else 0


def counts(findings: Sequence[Finding]) -> dict[str, int]:
    return {status: sum(f.status == status for f in findings) for status in (OK, WARN, FAIL)}


def report_json(findings: Sequence[Finding]) -> dict[str, Any]:
    return {"ok": exit_code(findings) == 0, "exit_code": exit_code(findings), "counts": counts(findings),
            "checks": [asdict(f) for f in findings]}


def render_table(findings: Sequence[Finding]) -> Table:
    table = Table(title="pgolf doctor", show_lines=False)
    for column in ("check", "status", "found", "fix"):
        table.add_column(column, overflow="fold")
    for f in findings:
        style = STATUS_STYLE[f.status]
        table.add_row(escape(f.check), f"[{style}]{f.status}[/]", escape(f.found), escape(f.fix))
    return table


def summary_line(findings: Sequence[Finding]) -> str:
    c = counts(findings)
    return f"{c[OK]} ok, {c[WARN]} warn, {c[FAIL]} fail"


# --- helpers ------------------------------------------------------------------------------------------


def version_tuple(text: str) -> tuple[int, ...]:
    """'2.13.0+cu128' -> (2, 13, 0): the leading release numbers only."""
    match = re.match(r"\d+(?:\.\d+)*", text.strip())
    return tuple(int(p) for p in match.group(0).split(".")) if match else ()


def required_minimum(package: str) -> tuple[int, ...] | None:
    """The lower bound pgolf's installed metadata puts on `package` (torch>=2.4, python>=3.10), if any."""
    try:
        if package == "python":
            return version_tuple((importlib.metadata.metadata("pgolf")["Requires-Python"] or "").lstrip(">="))
        requirements = importlib.metadata.requires("pgolf") or []
    except importlib.metadata.PackageNotFoundError:  # run from a source tree without installing
        return None
    for requirement in requirements:
        match = re.fullmatch(rf"{re.escape(package)}\s*>=\s*([\d.]+)", requirement.split(";")[0].strip())
        if match:
            return version_tuple(match.group(1))
    return None


def nvidia_driver() -> str | None:
    """The NVIDIA kernel driver's version, or None on a machine without one (read without CUDA)."""
    proc = Path("/proc/driver/nvidia/version")
    if proc.is_file():
        match = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d[\w.]*)", proc.read_text(errors="replace"))
        return match.group(1) if match else "present"
    return "present (nvidia-smi found)" if shutil.which("nvidia-smi") else None


def cuda_device_count() -> int:
    """CUDA devices torch can use; 0 when torch, CUDA or the driver is missing or broken."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def gib(n: float) -> str:
    return f"{n / 1024**3:,.1f} GiB"


def gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB"


# --- the machine --------------------------------------------------------------------------------------


def check_python(inputs: DoctorInputs) -> Finding:
    needed = required_minimum("python")
    have = sys.version_info[:3]
    found = f"Python {platform.python_version()} at {sys.executable}"
    if needed and have < needed:
        return Finding("python", FAIL, found, f"pgolf needs Python >= {'.'.join(map(str, needed))}",
                       {"version": platform.python_version()})
    return Finding("python", OK, found, facts={"version": platform.python_version()})


def check_torch(inputs: DoctorInputs) -> Finding:
    import torch

    version, cuda_build = torch.__version__, torch.version.cuda
    facts = {"version": version, "cuda_build": cuda_build, "driver": nvidia_driver()}
    minimum = required_minimum("torch")
    if minimum and version_tuple(version) < minimum:
        need = ".".join(map(str, minimum))
        return Finding("torch", FAIL, f"torch {version} is older than pgolf's requirement torch>={need}",
                       f'pip install "torch>={need}"', facts)
    if cuda_build is None and getattr(torch.version, "hip", None) is None:
        if facts["driver"]:
            return Finding("torch", FAIL, f"torch {version} is a CPU build, but this machine has an NVIDIA driver "
                           f"({facts['driver']}): every run would train on the CPU",
                           "install the CUDA build matching the driver, e.g. pip install torch "
                           "--index-url https://download.pytorch.org/whl/cu128", facts)
        return Finding("torch", OK, f"torch {version}, CPU build: right for this machine (no NVIDIA driver), "
                       "and --scale tiny is sized for a CPU", facts=facts)
    return Finding("torch", OK, f"torch {version}, built for CUDA {cuda_build}", facts=facts)


def check_cuda(inputs: DoctorInputs) -> Finding:
    import torch

    if not torch.cuda.is_available():
        hidden = inputs.environ.get("CUDA_VISIBLE_DEVICES")
        note = f" (CUDA_VISIBLE_DEVICES={hidden!r} can hide devices)" if hidden is not None else ""
        driver = nvidia_driver()
        if driver and torch.version.cuda:
            return Finding("cuda", FAIL, f"torch is built for CUDA {torch.version.cuda} and an NVIDIA driver ({driver}) "
                           f"is present, but torch cannot use CUDA{note}: every run would train on the CPU",
                           "install a torch build for a CUDA this driver supports (nvidia-smi shows its CUDA "
                           "version), or update the driver", {"available": False, "driver": driver})
        return Finding("cuda", WARN, f"CUDA is not available{note}: pgolf runs on the CPU in float32, which is fine "
                       "for --scale tiny (sized for a CPU)",
                       "for challenge scale use a CUDA machine (the records ran 8xH100 80GB SXM) with torch's CUDA build",
                       {"available": False})
    n = torch.cuda.device_count()
    facts = {"available": True, "devices": n, "cuda": torch.version.cuda, "driver": nvidia_driver()}
    found = f"{n} CUDA device(s), CUDA {torch.version.cuda}, driver {facts['driver'] or 'unknown'}"
    if n == CHALLENGE_GPUS:
        return Finding("cuda", OK, found, facts=facts)
    if CHALLENGE_GPUS % n:
        fix = (f"torchrun --nproc_per_node must divide {CHALLENGE_GPUS} (gradient accumulation is 8 // world size), "
               "or set train.grad_accum_steps")
    else:
        fix = (f"the challenge trains on {CHALLENGE_GPUS} GPUs; with {n}, gradient accumulation ({CHALLENGE_GPUS // n} "
               "micro-steps) keeps the global batch but a 600 s run makes fewer steps")
    return Finding("cuda", WARN, found, fix, facts)


def check_gpus(inputs: DoctorInputs) -> list[Finding] | None:
    import torch

    if not torch.cuda.is_available():
        return None
    rows = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        rows.append(gpu_finding(i, props.name, int(props.total_memory), f"{props.major}.{props.minor}"))
    return rows


def gpu_finding(index: int, name: str, memory_bytes: int, capability: str) -> Finding:
    """ok for the challenge's GPU (H100 80GB SXM), warn for anything else: timings would not carry over."""
    facts = {"name": name, "memory_bytes": memory_bytes, "capability": capability}
    found = f"{name}, {gib(memory_bytes)}, compute capability {capability}"
    # An H100 80GB reports 81,559 MiB; the SXM part is named "NVIDIA H100 80GB HBM3".
    is_h100_80 = "H100" in name and memory_bytes >= 80 * 1000**3
    if is_h100_80 and "HBM3" in name:
        return Finding(f"gpu {index}", OK, found, facts=facts)
    if is_h100_80:
        return Finding(f"gpu {index}", WARN, found, "the challenge is timed on H100 SXM (issue #1317); PCIe and NVL "
                       "parts step at other speeds, so a 600 s run here is not the challenge's", facts)
    return Finding(f"gpu {index}", WARN, found, "challenge scale expects H100 80GB SXM: fine for development, but step "
                   "counts and timings here will not match the challenge's", facts)


def check_nccl(inputs: DoctorInputs) -> Finding | None:
    import torch
    import torch.distributed as dist

    if not torch.cuda.is_available():
        return None
    available = dist.is_available() and dist.is_nccl_available()
    raw = torch.cuda.nccl.version() if available else None
    version = ".".join(map(str, raw)) if isinstance(raw, tuple) else (str(raw) if raw is not None else None)
    facts = {"available": available, "version": version}
    if not available:
        status = FAIL if torch.cuda.device_count() > 1 else WARN
        return Finding("nccl", status, "this torch build has no NCCL: multi-GPU runs (DDP over NCCL) cannot start",
                       "install an official CUDA build of torch (they bundle NCCL)", facts)
    return Finding("nccl", OK, f"NCCL {version} (the baseline's log shows 2.27.5)", facts=facts)


def check_bf16(inputs: DoctorInputs) -> Finding:
    import torch

    if not torch.cuda.is_available():
        return Finding("bf16", OK, "CPU: pgolf trains in float32 there (bf16 autocast is used on CUDA only)")
    if torch.cuda.is_bf16_supported():
        return Finding("bf16", OK, "bf16 supported (pgolf trains with bf16 autocast on CUDA, as the challenge)")
    return Finding("bf16", WARN, "this GPU has no native bf16: pgolf's CUDA path autocasts to bf16",
                   "use an Ampere or newer GPU (the challenge's H100 has bf16)")


def check_flash_attention(inputs: DoctorInputs) -> Finding:
    """FA3 (`flash_attn_interface`) or FA2 (`flash_attn`): pgolf's attention is torch SDPA and needs
    neither, but the records' train_gpt.py import FA3 bare and crash without it (issue #280)."""
    found, broken = {}, []
    for module in ("flash_attn_interface", "flash_attn"):
        if importlib.util.find_spec(module) is None:
            continue
        try:
            found[module] = str(getattr(importlib.import_module(module), "__version__", "")).strip()
        except Exception as exc:  # a wheel built for another torch or CUDA fails with ImportError/OSError
            broken.append(f"{module}: {type(exc).__name__}: {exc}")
    facts = {"importable": found, "broken": broken}
    listed = ", ".join(f"{m} {v}".strip() for m, v in found.items())
    if broken:
        return Finding("flash-attn", WARN, f"installed but fails to import ({'; '.join(broken)})",
                       "reinstall the wheel built for this torch and CUDA (the records pin e.g. FA3 cu128_torch291)",
                       facts)
    if "flash_attn_interface" in found:
        return Finding("flash-attn", OK, f"{listed} importable (FA3, as the records use)", facts=facts)
    if cuda_device_count() == 0:
        return Finding("flash-attn", OK, f"{listed + ' importable; FA3' if found else 'not installed'}: only GPU "
                       "runs of the records' scripts use it", facts=facts)
    what = f"only {listed} (FA2) is importable" if found else "neither flash_attn_interface (FA3) nor flash_attn is importable"
    return Finding("flash-attn", WARN, f"{what}: pgolf runs without it (torch SDPA), but the records' train_gpt.py "
                   "import flash_attn_interface bare and crash without it (issue #280)",
                   "to run the records' scripts here, install the FA3 wheel built for this torch and CUDA", facts)


def check_triton(inputs: DoctorInputs) -> Finding | None:
    if cuda_device_count() == 0:
        return None
    try:
        triton = importlib.import_module("triton")
    except Exception as exc:
        return Finding("triton", FAIL, f"triton does not import ({type(exc).__name__}: {exc}): torch.compile, which "
                       "pgolf uses on CUDA (train.compile: auto), needs it",
                       'pip install -e ".[gpu]", or run with --set train.compile=off (slower)')
    return Finding("triton", OK, f"triton {getattr(triton, '__version__', '?')} (torch.compile's GPU backend)")


# --- NCCL variables -------------------------------------------------------------------------------------

# What each variable does is from NCCL's environment-variable documentation unless another source is
# named; the pods are the challenge's (records' READMEs and logs).
NCCL_SWITCHES = {
    "NCCL_P2P_DISABLE": (
        "NCCL makes no direct GPU-to-GPU (P2P) transfers over NVLink or PCIe, so traffic between GPUs goes "
        "through host shared memory and every all-reduce on an NVLink machine (8xH100 SXM) slows down",
        "unset it on NVLink machines; it is a workaround for P2P hangs on some drivers and topologies "
        "(nvidia-smi topo -m shows the links)"),
    "NCCL_SHM_DISABLE": (
        "NCCL stops using host shared memory between GPUs that cannot use P2P and sends that traffic over the "
        "network (InfiniBand or IP sockets) instead",
        "unset it; if shared memory failed, give the container a larger /dev/shm (docker --shm-size) instead"),
    "NCCL_IB_DISABLE": (
        "NCCL uses no InfiniBand/RoCE and falls back to IP sockets between nodes; the baseline ran one 8xH100 node "
        "with it at 43.5 ms/step, while the 2026-03-18_FP16Embed_WD3600 record reports ~60 vs ~44 ms/step with it set",
        "unset it for single-node runs, or compare step_avg with and without it before a timed run"),
}
NCCL_DEBUG_LEVELS = ("VERSION", "WARN", "INFO", "TRACE")
NCCL_DEBUG_FIX = ("export NCCL_DEBUG=WARN (an explicit message whenever an NCCL call fails); INFO also shows the "
                  "transports and interfaces NCCL picked")


def socket_ifname_matches(spec: str, interfaces: Sequence[str]) -> list[str]:
    """The interfaces NCCL_SOCKET_IFNAME selects: comma-separated prefixes, `^` excludes, `=` matches exactly."""
    exclude = spec.startswith("^")
    body = spec[1:] if exclude else spec
    exact = body.startswith("=")
    body = body[1:] if exact else body
    prefixes = [p for p in body.split(",") if p]

    def named(interface: str) -> bool:
        return any(interface == p if exact else interface.startswith(p) for p in prefixes)

    return [i for i in interfaces if named(i) != exclude]


def _switch(name: str, value: str) -> Finding:
    meaning, fix = NCCL_SWITCHES[name]
    if value.strip() == "0":
        return Finding(f"env {name}", OK, f"{name}=0: the transport stays on (same as unset)")
    if value.strip() == "1":
        return Finding(f"env {name}", WARN, f"{name}=1: {meaning}", fix)
    return Finding(f"env {name}", WARN, f"{name}={value!r} is not 0 or 1, so what NCCL makes of it is unclear; "
                   f"set to 1: {meaning}", f"set it to 0 or 1, or unset it; {fix}")


def _p2p_level(value: str) -> Finding:
    if value.strip().upper() in ("LOC", "0"):
        return Finding("env NCCL_P2P_LEVEL", WARN, f"NCCL_P2P_LEVEL={value}: never use P2P, the same as "
                       f"NCCL_P2P_DISABLE=1: {NCCL_SWITCHES['NCCL_P2P_DISABLE'][0]}", NCCL_SWITCHES["NCCL_P2P_DISABLE"][1])
    return Finding("env NCCL_P2P_LEVEL", OK, f"NCCL_P2P_LEVEL={value}: P2P only between GPUs at most this far apart "
                   "(NCCL chooses the level itself when unset)")


def _socket_ifname(value: str) -> Finding:
    interfaces = [name for _, name in socket.if_nameindex()]
    chosen = socket_ifname_matches(value, interfaces)
    facts = {"interfaces": interfaces, "selected": chosen}
    if chosen:
        return Finding("env NCCL_SOCKET_IFNAME", OK, f"NCCL_SOCKET_IFNAME={value}: NCCL's sockets use "
                       f"{', '.join(chosen)} (automatic interface selection is off)", facts=facts)
    return Finding("env NCCL_SOCKET_IFNAME", WARN, f"NCCL_SOCKET_IFNAME={value} names none of this machine's "
                   f"interfaces ({', '.join(interfaces) or 'none'}): NCCL uses only the interfaces it names, so its "
                   "bootstrap stops with 'no socket interface found'", "unset it (NCCL then picks an interface itself) "
                   "or name one that exists here; values copied from another pod are the usual cause", facts)


def nccl_debug_finding(value: str | None, gpus: int) -> Finding | None:
    """NCCL_DEBUG as set, or a warning that it is unset where NCCL will run (two or more GPUs)."""
    if value is None:
        if gpus < 2:
            return None
        return Finding("env NCCL_DEBUG", WARN, "NCCL_DEBUG is unset: NCCL prints nothing of its own, so a failing or "
                       "hanging multi-GPU start shows no cause", NCCL_DEBUG_FIX)
    if value.strip().upper() not in NCCL_DEBUG_LEVELS:
        return Finding("env NCCL_DEBUG", WARN, f"NCCL_DEBUG={value!r} is none of {', '.join(NCCL_DEBUG_LEVELS)}",
                       NCCL_DEBUG_FIX)
    return Finding("env NCCL_DEBUG", OK, f"NCCL_DEBUG={value}: NCCL reports at this level")


def _nccl_net(value: str) -> Finding:
    note = (" (GCP-specific in the records: their 8xH100 pods set it for an NCCL 2.27.5 + gIB device issue)"
            if value.strip().lower() == "socket" else "")
    return Finding("env NCCL_NET", OK, f"NCCL_NET={value}: NCCL uses only this network transport{note}")


def _torch_async_errors(value: str) -> Finding:
    if value.strip() == "0":
        return Finding("env TORCH_NCCL_ASYNC_ERROR_HANDLING", WARN, "TORCH_NCCL_ASYNC_ERROR_HANDLING=0: torch does "
                       "not handle asynchronous NCCL errors, so a rank whose collective failed is not torn down",
                       "unset it (torch's default, 3, tears the process down on an NCCL error)")
    return Finding("env TORCH_NCCL_ASYNC_ERROR_HANDLING", OK, f"TORCH_NCCL_ASYNC_ERROR_HANDLING={value}: torch "
                   "acts on asynchronous NCCL errors (torch's ProcessGroupNCCL documentation)")


def check_nccl_env(inputs: DoctorInputs) -> list[Finding]:
    """Report the NCCL (and torch-NCCL) variables set, what each does and what to do about it."""
    env = inputs.environ
    rows: list[Finding] = []
    for name in NCCL_SWITCHES:
        if name in env:
            rows.append(_switch(name, env[name]))
    if "NCCL_P2P_LEVEL" in env:
        rows.append(_p2p_level(env["NCCL_P2P_LEVEL"]))
    if "NCCL_SOCKET_IFNAME" in env:
        rows.append(_socket_ifname(env["NCCL_SOCKET_IFNAME"]))
    if "NCCL_NET" in env:
        rows.append(_nccl_net(env["NCCL_NET"]))
    debug = nccl_debug_finding(env.get("NCCL_DEBUG"), cuda_device_count())
    if debug is not None:
        rows.append(debug)
    if "NCCL_ASYNC_ERROR_HANDLING" in env:
        rows.append(Finding("env NCCL_ASYNC_ERROR_HANDLING", WARN, "NCCL_ASYNC_ERROR_HANDLING is torch's deprecated "
                            "name: every rank warns about it (the baseline's train.log shows the warnings)",
                            "rename it to TORCH_NCCL_ASYNC_ERROR_HANDLING"))
    if "TORCH_NCCL_ASYNC_ERROR_HANDLING" in env:
        rows.append(_torch_async_errors(env["TORCH_NCCL_ASYNC_ERROR_HANDLING"]))
    checked = {*NCCL_SWITCHES, "NCCL_P2P_LEVEL", "NCCL_SOCKET_IFNAME", "NCCL_NET", "NCCL_DEBUG",
               "NCCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_ASYNC_ERROR_HANDLING"}
    others = sorted(k for k in env if k.startswith("NCCL_") and k not in checked)
    if others:
        rows.append(Finding("env NCCL (other)", OK, "also set, not checked here: "
                            + ", ".join(f"{k}={env[k]}" for k in others)))
    if not rows:
        rows.append(Finding("env NCCL", OK, "no NCCL variable set: NCCL chooses transports and interfaces itself"))
    return rows


def check_shared_memory(inputs: DoctorInputs) -> Finding | None:
    """NCCL's shared-memory transport lives in /dev/shm, which Docker limits to 64 MB by default."""
    if cuda_device_count() < 2 or not Path("/dev/shm").is_dir():
        return None
    size = shutil.disk_usage("/dev/shm").total
    if size < SHM_ADVISED_BYTES:
        return Finding("shm", WARN, f"/dev/shm holds {gib(size)}: NCCL's shared-memory setup has crashed in small "
                       "containers (PyTorch's own CI needed --shm-size=2gb)",
                       "start the container with --shm-size=2g or larger (or --ipc=host)", {"bytes": size})
    return Finding("shm", OK, f"/dev/shm holds {gib(size)}", facts={"bytes": size})


# --- data -----------------------------------------------------------------------------------------------


@dataclass
class ShardSurvey:
    """A data directory's shards, by header only (fast even for the full export)."""

    train: list[Path]
    val: list[Path]
    val_bytes: list[Path]
    tokens: dict[Path, int]
    damaged: list[str]

    def total(self, paths: Sequence[Path]) -> int:
        return sum(self.tokens.get(p, 0) for p in paths)


def survey_shards(directory: Path) -> ShardSurvey:
    train = shards.list_shards(directory, shards.TRAIN_GLOB)
    val = shards.list_shards(directory, shards.VAL_GLOB)
    val_bytes = shards.list_shards(directory, shards.VAL_BYTES_GLOB)
    tokens, damaged = {}, []
    for path in (*train, *val, *val_bytes):
        try:
            tokens[path] = shards.read_header(path)
        except DataError as exc:
            damaged.append(exc.message)
    return ShardSurvey(train, val, val_bytes, tokens, damaged)


def dataset_manifest(directory: Path) -> dict[str, Any] | None:
    from pgolf.data.textdata import read_manifest

    return read_manifest(directory)


def locate_tokenizer(explicit: Path | None, directory: Path | None, manifest: dict[str, Any] | None) -> Path:
    """--tokenizer, else what `pgolf run --data` would find: the manifest's, the challenge's layout, a lone .model."""
    if explicit is not None:
        return explicit
    if directory is None:
        raise DataError("no tokenizer to check", hint="Pass --data DIR or --tokenizer PATH.")
    from pgolf.data.dataset import find_tokenizer

    listed = [int(manifest["vocab_size"])] if manifest and manifest.get("vocab_size") else []
    vocabs = dict.fromkeys([*listed, *(r.vocab_size for r in VAL_REFERENCES)])
    errors = []
    for vocab in vocabs:
        try:
            return find_tokenizer(directory, vocab)
        except DataError as exc:
            errors.append(exc)
    raise errors[0]


def check_data_shards(inputs: DoctorInputs) -> Finding | None:
    if inputs.data is None:
        return None
    directory = inputs.data
    if not directory.is_dir():
        return Finding("data shards", FAIL, f"data directory not found: {directory}",
                       "pass --data DIR holding fineweb_train_*.bin and fineweb_val_*.bin (pgolf data fineweb makes one)")
    survey = survey_shards(directory)
    facts = {"train_shards": len(survey.train), "val_shards": len(survey.val),
             "train_tokens": survey.total(survey.train), "val_tokens": survey.total(survey.val)}
    if survey.damaged:
        more = f" (and {len(survey.damaged) - 1} more)" if len(survey.damaged) > 1 else ""
        return Finding("data shards", FAIL, f"{len(survey.damaged)} damaged shard(s): {survey.damaged[0]}{more}",
                       "delete the damaged files and fetch or build them again (pgolf data fineweb resumes and checks "
                       "every file)", facts | {"damaged": survey.damaged})
    if not survey.train or not survey.val:
        return Finding("data shards", FAIL, f"{directory} has {len(survey.train)} training and {len(survey.val)} "
                       "validation shards; both are needed",
                       "pgolf data fineweb --out DIR (the challenge's) or pgolf data text ... --out DIR (your own)", facts)
    found = (f"{len(survey.train)} training shard(s) ({facts['train_tokens']:,} tokens), {len(survey.val)} validation "
             f"shard(s) ({facts['val_tokens']:,} tokens), every header valid")
    manifest = dataset_manifest(directory)
    if "datasets/datasets" in directory.resolve().as_posix():
        return Finding("data shards", WARN, f"{found}; the path repeats datasets/datasets, the fingerprint of the leaky "
                       "CaseOps prep (issue #2127)", "check where these shards came from; the canonical exports are "
                       "flat directories of 80 training shards", facts)
    if manifest is not None and not is_challenge_export(manifest):
        listed = manifest.get("tokens_train")
        if listed is not None and int(listed) != facts["train_tokens"]:
            return Finding("data shards", FAIL, f"{found}; the manifest lists {int(listed):,} training tokens",
                           "shards were added or removed after the build: rebuild with pgolf data text", facts)
        return Finding("data shards", OK, f"{found} ({manifest.get('source')} data)", facts=facts)
    n = len(survey.train)
    if n == FULL_TRAIN_SHARDS:
        return Finding("data shards", OK, f"{found}: the full export's {FULL_TRAIN_SHARDS}", facts=facts)
    if n < FULL_TRAIN_SHARDS:
        repeat = (f"; the baseline reads ~{BASELINE_SHARDS_READ} shards in its 600 s, so a challenge-scale run here "
                  "sees data twice" if n < BASELINE_SHARDS_READ else "")
        return Finding("data shards", WARN, f"{found}: {n} of the full export's {FULL_TRAIN_SHARDS}{repeat}",
                       f"for challenge-scale runs fetch all {FULL_TRAIN_SHARDS} (sp1024/sp8192: pgolf data fineweb "
                       f"--train-shards {FULL_TRAIN_SHARDS} --out {directory})", facts)
    return Finding("data shards", WARN, f"{found}: more than the {FULL_TRAIN_SHARDS} every record trained on (143 was a "
                   "mis-staged dataset in #1334's repro, 1499 the leaky CaseOps prep of issue #2127)",
                   f"use a directory holding exactly the export's first {FULL_TRAIN_SHARDS} training shards", facts)


def check_val_tokens(inputs: DoctorInputs) -> Finding | None:
    if inputs.data is None or not inputs.data.is_dir():
        return None
    survey = survey_shards(inputs.data)
    if not survey.val:
        return Finding("data val tokens", FAIL, "no fineweb_val_*.bin shard", "fetch or build the validation split")
    damaged_val = [p for p in (*survey.val, *survey.val_bytes) if p not in survey.tokens]
    if damaged_val:
        return Finding("data val tokens", FAIL, f"damaged validation shard {damaged_val[0].name}: its count is unknown",
                       "fetch or build the validation split again")
    count = survey.total(survey.val)
    facts: dict[str, Any] = {"val_tokens": count}
    if survey.val_bytes and survey.total(survey.val_bytes) != count:
        return Finding("data val tokens", FAIL, f"the byte sidecar has {survey.total(survey.val_bytes):,} entries for "
                       f"{count:,} validation tokens", "rebuild the sidecar together with the validation shards", facts)
    manifest = dataset_manifest(inputs.data)
    listed = (manifest or {}).get("tokens_val")
    if listed is not None and int(listed) != count:
        return Finding("data val tokens", FAIL, f"{count:,} validation tokens, but the manifest lists {int(listed):,}",
                       f"delete {inputs.data}/fineweb_val_*.bin and fetch or build them again", facts)
    if manifest is not None and not is_challenge_export(manifest):
        return Finding("data val tokens", OK, f"{count:,} validation tokens ({manifest.get('source')} data: the "
                       "challenge's figures do not apply)", facts=facts)
    if manifest and manifest.get("vocab_size"):
        vocab = int(manifest["vocab_size"])
    else:
        try:
            from pgolf.data.tokenizer import load_tokenizer

            vocab = int(load_tokenizer(locate_tokenizer(inputs.tokenizer, inputs.data, manifest)).vocab_size())
        except DataError as exc:
            return Finding("data val tokens", WARN, f"{count:,} validation tokens; without a tokenizer the variant "
                           f"(and so the expected count) is unknown: {exc.message}",
                           "pass --tokenizer PATH to the shards' SentencePiece model", facts)
    facts["vocab_size"] = vocab
    references = [r for r in VAL_REFERENCES if r.vocab_size == vocab]
    if not references:
        return Finding("data val tokens", OK, f"{count:,} validation tokens (no challenge figure for vocab {vocab})",
                       facts=facts)
    for reference in references:
        if reference.matches(count):
            facts |= {"variant": reference.variant, "source": reference.source}
            return Finding("data val tokens", OK, f"{count:,} validation tokens: the challenge's {reference.variant} "
                           f"validation set", facts=facts)
    expected = "; ".join(f"{r.variant}: {r.expected()}" for r in references)
    known = known_bad_val(count)
    cause = f"; this count is {known}" if known else ""
    return Finding("data val tokens", FAIL, f"{count:,} validation tokens, not the challenge's ({expected}){cause}",
                   f"delete {inputs.data}/fineweb_val_*.bin and fetch them again (pgolf data fineweb checks each file)",
                   facts)


def check_tokenizer(inputs: DoctorInputs) -> Finding | None:
    if inputs.data is None and inputs.tokenizer is None:
        return None
    from pgolf.data.tokenizer import load_tokenizer
    from pgolf.recipe import ModelConfig

    directory = inputs.data if inputs.data is not None and inputs.data.is_dir() else None
    if inputs.tokenizer is None and directory is None:
        return None  # the shards check reports the missing directory
    manifest = dataset_manifest(directory) if directory is not None else None
    try:
        path = locate_tokenizer(inputs.tokenizer, directory, manifest)
        sp = load_tokenizer(path)
    except DataError as exc:
        return Finding("data tokenizer", FAIL, exc.message, exc.hint or "pass --tokenizer PATH to a SentencePiece .model")
    vocab = int(sp.vocab_size())
    facts: dict[str, Any] = {"path": str(path), "vocab_size": vocab}
    listed = (manifest or {}).get("vocab_size")
    if listed is not None and int(listed) != vocab:
        return Finding("data tokenizer", FAIL, f"{path.name} has {vocab} pieces, but the shards were made for vocab "
                       f"{int(listed)} (pgolf_dataset.json)", "use the tokenizer the shards were made with", facts)
    if directory is not None:
        survey = survey_shards(directory)
        for shard in (*survey.val, *survey.train[:1]):
            if shard not in survey.tokens:
                continue  # a damaged shard is the shards check's to report
            try:
                tokens = shards.read_shard(shard, vocab)  # every id below the vocabulary
            except DataError as exc:
                return Finding("data tokenizer", FAIL, f"{path.name} has {vocab} pieces, but {exc.message}",
                               "the shards and the tokenizer do not belong together: pass the right --tokenizer", facts)
            if shard in survey.val and shard == survey.val[0] and tokens.size and int(tokens[0]) != sp.bos_id():
                return Finding("data tokenizer", WARN, f"{shard.name} starts with id {int(tokens[0])}, not the "
                               f"tokenizer's BOS {sp.bos_id()}: every document should start with BOS",
                               "check that the shards were made with this tokenizer", facts)
    default_vocab = ModelConfig().vocab_size
    note = f"; recipes default to {default_vocab}: add --set model.vocab_size={vocab}" if vocab != default_vocab else ""
    checked = " and the shards' token ids fit it" if directory is not None else ""
    return Finding("data tokenizer", OK, f"{path} ({vocab} pieces){checked}{note}", facts=facts)


# --- resources ------------------------------------------------------------------------------------------


def existing_ancestor(path: Path) -> Path:
    """The path, or its nearest parent that exists (a run directory may not exist yet)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_status(free: int, need: int) -> str:
    """fail: not even one record-sized run's outputs fit; warn: less than `need`."""
    if free < record_run_bytes():
        return FAIL
    return WARN if free < need else OK


def record_run_bytes() -> int:
    """What one record-sized run writes and keeps: final_model.pt plus an artifact at the byte budget."""
    from pgolf.recipe import ExportConfig

    return RECORD_CHECKPOINT_BYTES + ExportConfig().budget_bytes


def missing_export_shards(data: Path | None) -> int:
    """Training shards of the challenge's export still to fetch: all 80 without --data, none for data of your own."""
    if data is None or not data.is_dir():
        return FULL_TRAIN_SHARDS
    if not is_challenge_export(dataset_manifest(data)):
        return 0
    return max(0, FULL_TRAIN_SHARDS - len(shards.list_shards(data, shards.TRAIN_GLOB)))


def check_disk(inputs: DoctorInputs) -> list[Finding]:
    """Room for RUNS_TO_KEEP record-sized runs where runs are written, and for the training shards still missing."""
    missing = missing_export_shards(inputs.data)
    shard_place = inputs.data if inputs.data is not None and inputs.data.is_dir() else inputs.fetch_dir
    places: dict[int, tuple[Path, int, list[str]]] = {}
    for place, need, what in ((inputs.runs_dir, RUNS_TO_KEEP * record_run_bytes(), f"{RUNS_TO_KEEP} record-sized runs"),
                              (shard_place, missing * SHARD_BYTES, f"{missing} more training shard(s)")):
        root = existing_ancestor(place)
        device = root.stat().st_dev
        where, total, reasons = places.get(device, (root, 0, []))
        places[device] = (where, total + need, reasons + ([what] if need else []))
    rows = []
    for where, need, reasons in places.values():
        free = shutil.disk_usage(where).free
        status = disk_status(free, need)
        facts = {"path": str(where), "free_bytes": free, "need_bytes": need}
        found = f"{gb(free)} free at {where}; {gb(need)} wanted for {' + '.join(reasons) or 'nothing'}"
        fix = {OK: "", WARN: "free space or point --out / --data at a larger volume (a full disk mid-fetch or mid-run "
                             "loses the work)",
               FAIL: f"under {gb(record_run_bytes())} free: a record-sized run cannot even save final_model.pt and its "
                     "artifact; free space first"}[status]
        rows.append(Finding("disk", status, found, fix, facts))
    return rows


def check_cpu(inputs: DoctorInputs) -> Finding:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    gpus = cuda_device_count()
    facts = {"usable": usable, "machine": os.cpu_count(), "gpus": gpus}
    found = f"{usable} CPU core(s) usable ({os.cpu_count()} in the machine)"
    if gpus and usable < gpus:
        return Finding("cpu", WARN, f"{found} for {gpus} GPUs: torchrun starts one process per GPU",
                       "use a machine with at least one core per GPU", facts)
    return Finding("cpu", OK, found, facts=facts)


def memory_bytes() -> tuple[int, int | None]:
    """(total, available) physical memory; available is None where the system does not say."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        fields = dict(re.findall(r"^(\w+):\s+(\d+) kB", meminfo.read_text(), flags=re.M))
        available = fields.get("MemAvailable")
        return int(fields["MemTotal"]) * 1024, int(available) * 1024 if available else None
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), None


def check_memory(inputs: DoctorInputs) -> Finding:
    total, available = memory_bytes()
    ranks = max(1, cuda_device_count())
    need = ranks * VAL_STREAM_BYTES_PER_TOKEN * LARGEST_VAL_TOKENS
    facts = {"total_bytes": total, "available_bytes": available, "ranks": ranks, "floor_bytes": need}
    found = f"{gib(total)} memory" + (f", {gib(available)} available" if available is not None else "")
    if available is not None and available < need:
        return Finding("memory", WARN, f"{found}: {ranks} rank(s) each hold the validation stream (up to "
                       f"{gib(need / ranks)} for sp1024) before the model", "free memory or use a larger machine; "
                       "--scale tiny needs far less", facts)
    return Finding("memory", OK, found, facts=facts)


CHECKS: tuple[tuple[str, Check], ...] = (
    ("python", check_python),
    ("torch", check_torch),
    ("cuda", check_cuda),
    ("gpu", check_gpus),
    ("nccl", check_nccl),
    ("bf16", check_bf16),
    ("flash-attn", check_flash_attention),
    ("triton", check_triton),
    ("env NCCL", check_nccl_env),
    ("shm", check_shared_memory),
    ("data shards", check_data_shards),
    ("data val tokens", check_val_tokens),
    ("data tokenizer", check_tokenizer),
    ("disk", check_disk),
    ("cpu", check_cpu),
    ("memory", check_memory),
)
