"""Cached stage outputs are trusted only while they match the checksums recorded when they were written.

Unit tests write real entries with `StageCache.writing` and damage real files; the end-to-end
test damages a real micro ablation's cache and runs it again.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
from pathlib import Path

import pytest
import yaml

from pgolf.study import cache as stagecache
from pgolf.study.cache import CHECKSUMS_FILE, CORRUPT_PREFIX, CorruptCacheEntry, StageCache

KEY = "0123456789abcdef0123"
OTHER = "fedcba9876543210fedc"
BLOB = bytes(range(256)) * 64


def make_cache(root: Path) -> tuple[StageCache, list[str]]:
    lines: list[str] = []
    return StageCache(root / "cache", log=lines.append), lines


def write_entry(cache: StageCache, stage="train", key=KEY, blob=BLOB, info=None) -> Path:
    with cache.writing(stage, key) as tmp:
        (tmp / "model.pt").write_bytes(blob)
        (tmp / "train.json").write_text(json.dumps({"info": info or {"bytes_total": 1234, "steps": 3}}))
    return cache.entry(stage, key)


def set_aside(cache: StageCache, stage="train", key=KEY) -> list[Path]:
    return sorted((cache.root / stage).glob(f"{CORRUPT_PREFIX}{key}-*"))


# --- a written entry verifies ----------------------------------------------------------------------------


def test_a_written_entry_records_every_file_and_verifies(tmp_path):
    cache, lines = make_cache(tmp_path)
    entry = write_entry(cache)
    recorded = json.loads((entry / CHECKSUMS_FILE).read_text())
    assert recorded["stage"] == "train" and recorded["key"] == KEY
    assert set(recorded["files"]) == {"model.pt", "train.json"}
    assert recorded["files"]["model.pt"]["bytes"] == len(BLOB) and len(recorded["files"]["model.pt"]["sha256"]) == 64
    assert cache.done("train", KEY)
    assert cache.read_bytes("train", KEY, "model.pt") == BLOB
    assert cache.read_json("train", KEY, "train.json")["info"]["bytes_total"] == 1234
    assert cache.path_verified("train", KEY, "model.pt") == entry / "model.pt"
    assert StageCache(cache.root).done("train", KEY)  # a fresh process (instance) verifies it too
    assert not lines and not set_aside(cache)


def test_verification_is_memoised_until_a_file_changes(tmp_path, monkeypatch):
    cache, lines = make_cache(tmp_path)
    entry = write_entry(cache)
    hashed: list[str] = []
    real = stagecache._sha256_file

    def counting(path: Path) -> str:  # the real hash, counted
        hashed.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(stagecache, "_sha256_file", counting)
    assert all(cache.done("train", KEY) for _ in range(50))
    assert sorted(hashed) == ["model.pt", "train.json"]  # hashed once, then only stat-ed
    data = bytearray((entry / "model.pt").read_bytes())
    data[100] ^= 0xFF  # same size, written in place
    (entry / "model.pt").write_bytes(bytes(data))
    assert not cache.done("train", KEY)
    assert len(lines) == 1 and "model.pt" in lines[0]


def test_a_file_not_listed_in_the_checksums_does_not_invalidate_the_entry(tmp_path):
    cache, lines = make_cache(tmp_path)
    entry = write_entry(cache)
    (entry / "notes.txt").write_text("a user's note")
    assert cache.done("train", KEY) and not lines
    with pytest.raises(FileNotFoundError, match="not a recorded file"):  # but readers never return it
        cache.read_bytes("train", KEY, "notes.txt")
    assert entry.is_dir()  # a reader asking for an unknown name is not damage


# --- damage is reported, moved aside and recomputed --------------------------------------------------------


def truncate_checkpoint(entry: Path) -> None:
    path = entry / "model.pt"
    path.write_bytes(path.read_bytes()[:1000])


def edit_one_byte_of_json(entry: Path) -> None:
    path = entry / "train.json"
    path.write_text(path.read_text().replace("1234", "1235"))  # same size, still valid JSON


def drop_a_json_key(entry: Path) -> None:
    path = entry / "train.json"
    path.write_text(json.dumps({"info": {"steps": 3}}))


def delete_checksums(entry: Path) -> None:
    (entry / CHECKSUMS_FILE).unlink()


def garble_checksums(entry: Path) -> None:
    (entry / CHECKSUMS_FILE).write_text('{"format": ')


def delete_checkpoint(entry: Path) -> None:
    (entry / "model.pt").unlink()


DAMAGE = {
    truncate_checkpoint: "model.pt: 1000 bytes, 16384 recorded",
    edit_one_byte_of_json: "train.json: SHA-256 differs",
    drop_a_json_key: "train.json:",
    delete_checksums: f"{CHECKSUMS_FILE} is missing",
    garble_checksums: f"{CHECKSUMS_FILE} is unreadable",
    delete_checkpoint: "model.pt is missing",
}


@pytest.mark.parametrize("damage", list(DAMAGE), ids=lambda f: f.__name__)
def test_a_damaged_entry_is_not_done_is_reported_moved_aside_and_rewritten(tmp_path, damage):
    cache, lines = make_cache(tmp_path)
    entry = write_entry(cache)
    assert cache.done("train", KEY)  # memoised before the damage
    damage(entry)
    assert not cache.done("train", KEY)
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith(f"cache: train output {KEY} is damaged: ") and DAMAGE[damage] in line, line
    assert "moved aside" in line and "recomputed" in line
    assert not entry.exists()
    [aside] = set_aside(cache)
    assert aside.name in line
    assert not cache.done("train", KEY) and len(lines) == 1  # reported once
    write_entry(cache)  # the stage is recomputed under the same key
    assert cache.done("train", KEY) and StageCache(cache.root).done("train", KEY)
    assert cache.read_bytes("train", KEY, "model.pt") == BLOB


def test_an_entry_from_an_older_pgolf_has_no_checksums_and_is_recomputed(tmp_path):
    cache, lines = make_cache(tmp_path)
    old = cache.entry("eval", KEY)
    old.mkdir(parents=True)
    (old / "result.json").write_text(json.dumps({"val_bpb": 1.5}))  # what the previous version wrote
    assert not cache.done("eval", KEY)
    assert len(lines) == 1 and "older pgolf" in lines[0] and "eval output" in lines[0]


def test_checksums_of_another_entry_do_not_vouch_for_this_one(tmp_path):
    cache, lines = make_cache(tmp_path)
    entry = write_entry(cache)
    entry.rename(cache.entry("train", OTHER))  # an entry under a key it was not written for
    assert not cache.done("train", OTHER)
    assert len(lines) == 1 and f"does not describe train entry {OTHER}" in lines[0]


def test_readers_return_only_verified_content(tmp_path):
    cache, lines = make_cache(tmp_path)
    entry = write_entry(cache)
    assert cache.done("train", KEY)
    drop_a_json_key(entry)  # damaged after the scheduler saw it done: the reader still catches it
    with pytest.raises(CorruptCacheEntry, match="train.json") as caught:
        cache.read_json("train", KEY, "train.json")
    assert caught.value.stage == "train" and caught.value.cache_key == KEY
    assert pickle.loads(pickle.dumps(caught.value)).render() == caught.value.render()  # crosses worker processes
    assert len(lines) == 1 and not entry.exists()
    with pytest.raises(FileNotFoundError):
        cache.read_bytes("train", KEY, "model.pt")

    entry = write_entry(cache)
    truncate_checkpoint(entry)
    with pytest.raises(CorruptCacheEntry, match="model.pt"):
        cache.path_verified("train", KEY, "model.pt")
    assert len(lines) == 2 and not entry.exists()


def test_only_the_latest_damaged_copy_of_a_key_is_kept(tmp_path):
    cache, lines = make_cache(tmp_path)
    for _ in range(3):
        truncate_checkpoint(write_entry(cache))
        assert not cache.done("train", KEY)
    assert len(lines) == 3 and len(set_aside(cache)) == 1
    write_entry(cache, key=OTHER)
    assert cache.done("train", OTHER)  # other keys' entries are untouched
    assert cache.remove_stale_temporaries() == 0 and len(set_aside(cache)) == 1  # not a temporary


def test_writing_over_a_damaged_entry_replaces_it(tmp_path):
    cache, lines = make_cache(tmp_path)
    truncate_checkpoint(write_entry(cache))
    write_entry(cache)  # no `done` in between: the damaged entry is in the rename's way
    assert len(lines) == 1 and "model.pt" in lines[0]
    assert cache.done("train", KEY) and cache.read_bytes("train", KEY, "model.pt") == BLOB


def test_writing_beside_a_verified_entry_keeps_it(tmp_path):
    cache, lines = make_cache(tmp_path)
    write_entry(cache)
    write_entry(cache, blob=b"another writer's bytes")  # lost a race with a finished writer of the key
    assert cache.read_bytes("train", KEY, "model.pt") == BLOB and not lines
    assert not list((cache.root / "train").glob(".tmp-*"))


def test_the_checksums_name_is_reserved(tmp_path):
    cache, _ = make_cache(tmp_path)
    with pytest.raises(ValueError, match="reserved"), cache.writing("train", KEY) as tmp:
        (tmp / CHECKSUMS_FILE).write_text("{}")
    assert not cache.entry("train", KEY).exists() and not list((cache.root / "train").glob(".tmp-*"))


# --- stored errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ['{"stage": "eval", "err', "[1, 2]", '{"stage": "eval"}', "\udcff"],
                         ids=["truncated", "not-a-dict", "no-error", "not-utf8"])
def test_a_damaged_error_record_counts_as_no_error_and_is_reported(tmp_path, text):
    cache, lines = make_cache(tmp_path)
    path = cache.error_path("eval", KEY)
    path.parent.mkdir(parents=True)
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    assert cache.error("eval", KEY) is None
    assert len(lines) == 1 and f"eval error record {KEY}.error.json" in lines[0]
    assert not path.exists() and cache.error("eval", KEY) is None and len(lines) == 1
    cache.record_error("eval", KEY, {"stage": "eval", "error": "boom"})
    assert cache.error("eval", KEY)["error"] == "boom"


# --- a real ablation, damaged and run again -----------------------------------------------------------------


@contextlib.contextmanager
def one_thread():
    """Bit-identical retraining: CPU reductions split work by the intra-op thread count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_a_damaged_ablation_cache_is_reported_and_exactly_the_damaged_stages_rerun(tmp_path):
    import torch

    from pgolf.study.jobs import Job, execute_job
    from pgolf.study.plan import plan_ablation
    from pgolf.study.scheduler import run_ablation
    from pgolf.study.spec import AblationSpec
    from tests.ablation_techniques import MODULE
    from tests.conftest import MICRO, REPO

    stride = f"{MODULE}:HalfStride"
    recipe = tmp_path / "study.yaml"
    recipe.write_text(yaml.safe_dump({"base": str(REPO / "recipes" / "baseline.yaml"), "name": "study"}))
    spec = AblationSpec(recipe=str(recipe), toggle=[stride], seeds=[1], scale="tiny", set=list(MICRO))
    # HalfStride is an eval-stage toggle: both arms share one checkpoint and one artifact
    out = tmp_path / "ablation"
    first_log: list[str] = []
    with one_thread():
        _, first = run_ablation(spec, out, log=first_log.append)
    assert first["counts"] == {"train": {"ran": 1, "reused": 1}, "export": {"ran": 1, "reused": 1},
                               "eval": {"ran": 2, "reused": 0}}
    assert not [line for line in first_log if "damaged" in line]
    runs = {(r["arm"], r["seed"]): r for r in first["runs"]}
    keys = runs[("none", 1)]["keys"]
    cache = out / "cache"
    checkpoint = cache / "train" / keys["train"] / "final_model.pt"
    original = torch.load(checkpoint, weights_only=True)
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])  # truncated
    result = cache / "eval" / keys["eval"] / "result.json"
    edited = json.loads(result.read_text())
    del edited["bytes_total"]  # the KeyError the unverified cache crashed with
    result.write_text(json.dumps(edited, indent=2))
    record = out / "runs" / "none-seed1.json"  # derived records: rewritten from the cache, never read back
    record.write_text(record.read_text()[:40])
    (out / "summary.json").write_text("{")

    second_log: list[str] = []
    with one_thread():
        _, second = run_ablation(AblationSpec(**spec.to_dict()), out, log=second_log.append)
    damaged = [line for line in second_log if "damaged" in line]
    assert len(damaged) == 2, second_log
    assert any(f"train output {keys['train']} is damaged: final_model.pt:" in line for line in damaged), damaged
    assert any(f"eval output {keys['eval']} is damaged: result.json:" in line for line in damaged), damaged
    assert second["counts"] == {"train": {"ran": 1, "reused": 1}, "export": {"ran": 0, "reused": 2},
                                "eval": {"ran": 1, "reused": 1}}
    again = {(r["arm"], r["seed"]): r for r in second["runs"]}
    assert again[("none", 1)]["stages"] == {"train": "ran", "export": "reused", "eval": "ran"}
    for arm in ("none", stride):
        assert again[(arm, 1)]["status"] == "ok"
        assert again[(arm, 1)]["result"]["val_bpb"] == runs[(arm, 1)]["result"]["val_bpb"]
        assert again[(arm, 1)]["result"]["bytes_total"] == runs[(arm, 1)]["result"]["bytes_total"]
    retrained = torch.load(checkpoint, weights_only=True)
    assert retrained.keys() == original.keys() and all(torch.equal(retrained[k], original[k]) for k in original)
    assert json.loads(record.read_text())["result"]["val_bpb"] == runs[("none", 1)]["result"]["val_bpb"]
    assert json.loads((out / "summary.json").read_text())["counts"] == second["counts"]
    assert len(list((cache / "train").glob(f"{CORRUPT_PREFIX}{keys['train']}-*"))) == 1

    # Damage found by a job reading its input (after the scheduler saw it verified): the job
    # fails with one clear message and records no error, so the next invocation redoes both.
    artifact = cache / "export" / keys["export"] / "artifact.pga"
    artifact.write_bytes(b"\0" + artifact.read_bytes()[1:])
    run = next(r for r in plan_ablation(AblationSpec(**spec.to_dict())).runs if r.arm.on == ())
    job = Job("eval", run.keys.eval, run.recipe, str(cache), run.keys.train, run.keys.export, run.material["eval"],
              run.label, str(tmp_path / "job.log"))
    outcome = execute_job(job)
    assert not outcome["ok"] and f"cached export output {keys['export']} is damaged (artifact.pga:" in outcome["error"]
    assert "\n" not in outcome["error"]
    assert not (cache / "eval" / f"{run.keys.eval}.error.json").exists()
    assert not (cache / "export" / keys["export"]).exists()
    assert "is damaged: artifact.pga" in (tmp_path / "job.log").read_text()


def test_a_checkpoint_read_through_the_cache_loads(tmp_path):
    """The export job loads the checkpoint from verified bytes rather than from a path."""
    import torch

    cache, _ = make_cache(tmp_path)
    buffer = io.BytesIO()
    torch.save({"w": torch.arange(6.0)}, buffer)
    write_entry(cache, blob=buffer.getvalue())
    state = torch.load(io.BytesIO(cache.read_bytes("train", KEY, "model.pt")), map_location="cpu", weights_only=True)
    assert torch.equal(state["w"], torch.arange(6.0))
