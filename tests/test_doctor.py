"""`pgolf doctor` on this machine and on data directories the tests write: real shards (pgolf.data.shards),
real SentencePiece tokenizers (trained here on the pydoc topics in a fraction of a second)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pgolf import doctor
from pgolf.cli import app
from pgolf.data import shards
from pgolf.data.textdata import build_dataset

NCCL_VARIABLES = ("NCCL_P2P_DISABLE", "NCCL_SHM_DISABLE", "NCCL_IB_DISABLE", "NCCL_P2P_LEVEL", "NCCL_SOCKET_IFNAME",
                  "NCCL_NET", "NCCL_DEBUG", "NCCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_ALGO")


def on_a_gpu_machine() -> bool:
    import torch

    return torch.cuda.is_available() or doctor.nvidia_driver() is not None


def pgolf_doctor(*args: str) -> tuple[int, dict]:
    outcome = CliRunner().invoke(app, ["doctor", "--json", *args])
    assert outcome.exception is None or isinstance(outcome.exception, SystemExit), outcome.output
    return outcome.exit_code, json.loads(outcome.stdout)


def rows(report: dict, check: str) -> list[dict]:
    return [row for row in report["checks"] if row["check"] == check]


def row(report: dict, check: str) -> dict:
    (only,) = rows(report, check)
    return only


@pytest.fixture(autouse=True)
def no_nccl_variables(monkeypatch):
    """The report must not depend on NCCL variables of whoever runs the tests."""
    for name in NCCL_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def documents() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> Path:
    """A dataset `pgolf data text` would write: tokenizer, several training shards, one validation shard."""
    docs = documents()
    out = tmp_path_factory.mktemp("text-data")
    build_dataset(out, docs[:-10], docs[-10:], 1024, shard_tokens=20_000)
    return out


@pytest.fixture(scope="module")
def tokenizer_512(tmp_path_factory) -> Path:
    from pgolf.data.tokenizer import train_tokenizer

    return train_tokenizer(documents(), tmp_path_factory.mktemp("tok512") / "small", 512, threads=1)


def copy_of(source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(source, tmp_path / "data"))


@pytest.mark.skipif(on_a_gpu_machine(), reason="describes a machine without CUDA")
def test_on_this_cpu_machine_cuda_is_a_warning_and_tiny_scale_runs_on_cpu():
    code, report = pgolf_doctor()
    assert code == 0 and report["exit_code"] == 0 and report["ok"]
    cuda = row(report, "cuda")
    assert cuda["status"] == "warn" and cuda["facts"] == {"available": False}
    assert "CPU" in cuda["found"] and "--scale tiny" in cuda["found"]
    assert row(report, "torch")["status"] == "ok" and row(report, "torch")["facts"]["cuda_build"] is None
    assert row(report, "flash-attn")["status"] in ("ok", "warn")
    assert not rows(report, "triton") and not rows(report, "gpu 0")  # GPU-only checks stay out of a CPU report
    names = {r["check"] for r in report["checks"]}
    assert {"python", "torch", "cuda", "bf16", "flash-attn", "env NCCL", "disk", "cpu", "memory"} <= names
    assert not any(name.startswith("data") for name in names)  # no --data, no data checks
    assert report["counts"] == {s: sum(r["status"] == s for r in report["checks"]) for s in ("ok", "warn", "fail")}


def test_the_table_names_each_check_and_sums_up():
    outcome = CliRunner().invoke(app, ["doctor"])
    assert outcome.exit_code in (0, 1)
    assert "pgolf doctor" in outcome.stdout and "python" in outcome.stdout and "memory" in outcome.stdout
    assert " ok, " in outcome.stdout and " fail" in outcome.stdout.splitlines()[-1]


def test_a_dataset_of_our_own_is_fingerprinted(text_data):
    code, report = pgolf_doctor("--data", str(text_data))
    train = shards.list_shards(text_data, shards.TRAIN_GLOB)
    val = shards.list_shards(text_data, shards.VAL_GLOB)
    assert len(train) > 1 and len(val) == 1
    found = row(report, "data shards")
    assert found["status"] == "ok", found
    assert found["facts"] == {"train_shards": len(train), "val_shards": 1,
                              "train_tokens": sum(shards.read_header(p) for p in train),
                              "val_tokens": shards.read_header(val[0])}
    val_tokens = row(report, "data val tokens")
    manifest = json.loads((text_data / "pgolf_dataset.json").read_text())
    assert val_tokens["status"] == "ok" and val_tokens["facts"]["val_tokens"] == manifest["tokens_val"]
    assert "challenge's figures do not apply" in val_tokens["found"]
    tokenizer = row(report, "data tokenizer")
    assert tokenizer["status"] == "ok"
    assert tokenizer["facts"] == {"path": str(text_data / "pgolf_1024_bpe.model"), "vocab_size": 1024}
    # Data of your own is not the challenge's export: the disk is asked for no training shards.
    assert sum(r["facts"]["need_bytes"] for r in rows(report, "disk")) == doctor.RUNS_TO_KEEP * doctor.record_run_bytes()
    assert code == 0 or any(r["status"] == "fail" for r in report["checks"] if not r["check"].startswith("data"))


def test_a_damaged_shard_fails_the_shards_check(text_data, tmp_path):
    data = copy_of(text_data, tmp_path)
    damaged = shards.list_shards(data, shards.TRAIN_GLOB)[1]
    damaged.write_bytes(damaged.read_bytes()[:-2])
    code, report = pgolf_doctor("--data", str(data))
    assert code == 1
    found = row(report, "data shards")
    assert found["status"] == "fail" and str(damaged) in found["found"] and "size mismatch" in found["found"]
    assert row(report, "data tokenizer")["status"] == "ok"  # the other data checks still run


def test_a_missing_tokenizer_fails_the_tokenizer_check(text_data, tmp_path):
    data = copy_of(text_data, tmp_path)
    (data / "pgolf_1024_bpe.model").unlink()
    code, report = pgolf_doctor("--data", str(data))
    assert code == 1
    tokenizer = row(report, "data tokenizer")
    assert tokenizer["status"] == "fail" and "no tokenizer found" in tokenizer["found"]
    assert "--tokenizer" in tokenizer["fix"]
    assert row(report, "data shards")["status"] == "ok"

    code, report = pgolf_doctor("--data", str(data), "--tokenizer", str(tmp_path / "absent.model"))
    assert code == 1 and "tokenizer not found" in row(report, "data tokenizer")["found"]


def test_a_tokenizer_of_another_vocabulary_fails(text_data, tokenizer_512, tmp_path):
    code, report = pgolf_doctor("--data", str(text_data), "--tokenizer", str(tokenizer_512))
    assert code == 1
    tokenizer = row(report, "data tokenizer")
    assert tokenizer["status"] == "fail" and "512 pieces" in tokenizer["found"] and "vocab 1024" in tokenizer["found"]

    # Without a manifest to compare with, the shards' token ids give the mismatch away.
    data = copy_of(text_data, tmp_path)
    (data / "pgolf_dataset.json").unlink()
    code, report = pgolf_doctor("--data", str(data), "--tokenizer", str(tokenizer_512))
    assert code == 1
    tokenizer = row(report, "data tokenizer")
    assert tokenizer["status"] == "fail" and "out of range for vocab size 512" in tokenizer["found"]


def write_challenge_layout(directory: Path, tokenizer: Path, val_tokens: int, train_shards: int) -> Path:
    """The challenge's flat export: fineweb_1024_bpe.model beside the shards, no pgolf manifest."""
    directory.mkdir()
    shutil.copyfile(tokenizer, directory / "fineweb_1024_bpe.model")
    shards.write_shard(directory / shards.shard_name("val", 0), np.ones(val_tokens, dtype=np.uint16))  # all BOS
    for i in range(train_shards):
        shards.write_shard(directory / shards.shard_name("train", i), np.array([1, 5, 6], dtype=np.uint16))
    return directory


def test_the_challenge_validation_count_is_checked_against_its_logs(text_data, tmp_path):
    sp1024 = doctor.VAL_REFERENCES[0]
    full = sp1024.targets + 1  # the whole stream whose val_tokens the baseline's log prints as 63,779,840
    data = write_challenge_layout(tmp_path / "sp1024", text_data / "pgolf_1024_bpe.model", full, 80)
    code, report = pgolf_doctor("--data", str(data))
    val = row(report, "data val tokens")
    assert val["status"] == "ok" and val["facts"]["variant"] == "sp1024" and val["facts"]["val_tokens"] == full
    assert row(report, "data shards")["status"] == "ok" and "full export's 80" in row(report, "data shards")["found"]
    assert row(report, "data tokenizer")["status"] == "ok"
    # With all 80 shards present, the disk is asked only for the runs.
    disk = [r for r in rows(report, "disk") if r["facts"]["need_bytes"]]
    assert sum(r["facts"]["need_bytes"] for r in disk) == doctor.RUNS_TO_KEEP * doctor.record_run_bytes()

    truncated = write_challenge_layout(tmp_path / "truncated", text_data / "pgolf_1024_bpe.model", 9_662_465, 10)
    code, report = pgolf_doctor("--data", str(truncated))
    assert code == 1
    val = row(report, "data val tokens")
    assert val["status"] == "fail" and "63,779,841" in val["found"] and "#1923" in val["found"]
    shards_row = row(report, "data shards")
    assert shards_row["status"] == "warn" and "10 of the full export's 80" in shards_row["found"]
    assert "--train-shards 80" in shards_row["fix"]


def test_validation_references_cover_one_window_and_no_more():
    sp1024 = doctor.VAL_REFERENCES[0]
    assert sp1024.matches(63_779_841) and sp1024.matches(63_779_840 + 1024)
    assert not sp1024.matches(63_779_840) and not sp1024.matches(63_779_840 + 1025)
    caseops = next(r for r in doctor.VAL_REFERENCES if r.variant == "sp8192 CaseOps")
    assert caseops.matches(47_853_344) and not caseops.matches(47_853_345)


def test_nccl_variables_are_reported_with_their_advice(monkeypatch):
    monkeypatch.setenv("NCCL_P2P_DISABLE", "1")
    monkeypatch.setenv("NCCL_IB_DISABLE", "1")
    monkeypatch.setenv("NCCL_SHM_DISABLE", "yes please")  # broken: neither 0 nor 1
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "=nosuchif0")
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    monkeypatch.setenv("NCCL_ASYNC_ERROR_HANDLING", "1")
    monkeypatch.setenv("NCCL_ALGO", "Ring")
    code, report = pgolf_doctor()
    p2p = row(report, "env NCCL_P2P_DISABLE")
    assert p2p["status"] == "warn" and "NVLink" in p2p["found"] and "unset it" in p2p["fix"]
    ib = row(report, "env NCCL_IB_DISABLE")
    assert ib["status"] == "warn" and "IP sockets" in ib["found"]
    shm = row(report, "env NCCL_SHM_DISABLE")
    assert shm["status"] == "warn" and "not 0 or 1" in shm["found"]
    ifname = row(report, "env NCCL_SOCKET_IFNAME")
    assert ifname["status"] == "warn" and "names none of this machine's interfaces" in ifname["found"]
    assert ifname["facts"]["selected"] == [] and ifname["facts"]["interfaces"]
    assert row(report, "env NCCL_DEBUG")["status"] == "ok"
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING" in row(report, "env NCCL_ASYNC_ERROR_HANDLING")["fix"]
    assert "NCCL_ALGO=Ring" in row(report, "env NCCL (other)")["found"]
    assert not rows(report, "env NCCL")  # the "nothing set" row is only for an empty environment
    if not on_a_gpu_machine():
        assert code == 0  # warnings never fail the command


def test_socket_ifname_follows_nccls_syntax():
    interfaces = ["lo", "eth0", "eth1", "docker0"]
    assert doctor.socket_ifname_matches("eth", interfaces) == ["eth0", "eth1"]
    assert doctor.socket_ifname_matches("=eth0", interfaces) == ["eth0"]
    assert doctor.socket_ifname_matches("=eth0,eth1", interfaces) == ["eth0", "eth1"]
    assert doctor.socket_ifname_matches("^docker", interfaces) == ["lo", "eth0", "eth1"]
    assert doctor.socket_ifname_matches("^=docker0", interfaces) == ["lo", "eth0", "eth1"]
    assert doctor.socket_ifname_matches("ib", interfaces) == []


def test_a_check_that_raises_becomes_its_own_failure_and_the_rest_still_run():
    def broken(inputs: doctor.DoctorInputs) -> doctor.Finding:
        raise KeyError("NCCL_SOCKET_IFNAME")

    checks = (("broken", broken), ("cpu", doctor.check_cpu))
    findings = doctor.run_checks(doctor.DoctorInputs(), checks)
    assert [(f.check, f.status) for f in findings] == [("broken", "fail"), ("cpu", "ok")]
    assert "KeyError" in findings[0].found and "NCCL_SOCKET_IFNAME" in findings[0].found
    assert doctor.exit_code(findings) == 1
    with pytest.raises(KeyError):
        doctor.run_checks(doctor.DoctorInputs(), checks, reraise=True)


def test_a_missing_data_directory_is_a_failed_check_not_a_crash(tmp_path):
    code, report = pgolf_doctor("--data", str(tmp_path / "nowhere"))
    assert code == 1
    assert row(report, "data shards")["status"] == "fail" and "not found" in row(report, "data shards")["found"]
    assert not rows(report, "data val tokens") and not rows(report, "data tokenizer")


def test_disk_thresholds():
    one_run = doctor.record_run_bytes()
    assert one_run == doctor.RECORD_CHECKPOINT_BYTES + 16_000_000
    assert doctor.disk_status(one_run - 1, 10 * one_run) == "fail"
    assert doctor.disk_status(one_run, 10 * one_run) == "warn"
    assert doctor.disk_status(10 * one_run, 10 * one_run) == "ok"
    assert doctor.SHARD_BYTES == 200_001_024


def test_the_challenge_gpu_is_ok_and_others_warn():
    mib = 1024**2
    assert doctor.gpu_finding(0, "NVIDIA H100 80GB HBM3", 81_559 * mib, "9.0").status == "ok"  # SXM
    pcie = doctor.gpu_finding(1, "NVIDIA H100 PCIe", 81_559 * mib, "9.0")
    assert pcie.status == "warn" and "#1317" in pcie.fix
    h200 = doctor.gpu_finding(2, "NVIDIA H200", 143_771 * mib, "9.0")
    assert h200.status == "warn" and "H100 80GB SXM" in h200.fix and h200.check == "gpu 2"


def test_nccl_debug_unset_is_a_warning_only_where_nccl_runs():
    assert doctor.nccl_debug_finding(None, 1) is None
    unset = doctor.nccl_debug_finding(None, 8)
    assert unset is not None and unset.status == "warn" and "NCCL_DEBUG=WARN" in unset.fix
    assert doctor.nccl_debug_finding("warn", 8).status == "ok"
    assert doctor.nccl_debug_finding("LOUD", 8).status == "warn"
