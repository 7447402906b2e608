"""`pgolf data fineweb` against a dataset repository laid out like the challenge's, on local disk.

The fixture writes the export's layout itself (manifest.json, shards through pgolf.data.shards, the
official tokenizer when ../shared/tokenizers has it, else the embedded corpus's), and the fetch
reads it through `LocalRepository`, the same code path the Hub source feeds. No network.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pgolf.data import shards
from pgolf.data.dataset import ensure_embedded_dataset, load_dataset
from pgolf.data.fineweb import HubRepository, LocalRepository, fetch_fineweb, source_for
from pgolf.errors import DataError
from tests.conftest import REPO, TOKENIZERS
from tests.test_cli import micro_flags, pgolf

TRAIN_SHARDS = 3
DATASET = "fineweb10B_sp1024"


def write_repository(root: Path) -> Path:
    """A miniature of the challenge's export: root/datasets/{manifest.json, datasets/, tokenizers/}."""
    from pgolf.data.tokenizer import load_tokenizer

    official = TOKENIZERS / "fineweb_1024_bpe.model"
    embedded = ensure_embedded_dataset(1024)
    tok_source = official if official.is_file() else embedded / "pgolf_1024_bpe.model"
    export = root / "datasets"
    (export / "tokenizers").mkdir(parents=True)
    shutil.copyfile(tok_source, export / "tokenizers" / "fineweb_1024_bpe.model")
    # Token ids: the embedded corpus re-encoded with the repository's tokenizer when it differs.
    sp = load_tokenizer(tok_source, 1024)
    train_src = np.asarray(shards.read_shard(embedded / shards.shard_name("train", 0)))
    val_src = np.asarray(shards.read_shard(embedded / shards.shard_name("val", 0)))
    if tok_source == official:
        own = load_tokenizer(embedded / "pgolf_1024_bpe.model", 1024)

        def reencode(tokens: np.ndarray) -> np.ndarray:
            """The first documents (about 100k tokens: enough for a micro run, quick to encode)."""
            docs = np.split(tokens, shards.document_starts(tokens, 1)[1:])
            keep = int(np.searchsorted(np.cumsum([d.size for d in docs]), 100_000)) + 1
            texts = [own.decode(d[1:].tolist()) for d in docs[:keep]]
            return np.concatenate([[1, *ids] for ids in sp.encode(texts)]).astype(np.int64)

        train_src, val_src = reencode(train_src), reencode(val_src)
    data = export / "datasets" / DATASET
    data.mkdir(parents=True)
    shards.write_shard(data / shards.shard_name("val", 0), val_src)
    for i, part in enumerate(np.array_split(train_src, TRAIN_SHARDS)):
        shards.write_shard(data / shards.shard_name("train", i), part)
    manifest = {
        "version": "10B",
        "tokenizers": [{"name": "sp_bpe_1024", "kind": "sentencepiece_bpe", "vocab_size": 1024, "bos_id": 1,
                        "eos_id": 2, "model_path": "tokenizers/fineweb_1024_bpe.model",
                        "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"}],
        "datasets": [{"name": DATASET, "tokenizer_name": "sp_bpe_1024", "tokenizer_kind": "sentencepiece_bpe",
                      "path": f"datasets/{DATASET}", "vocab_size": 1024, "bos_id": 1, "eos_id": 2,
                      "stats": {"files_train": TRAIN_SHARDS, "files_val": 1, "tokens_val": int(val_src.size),
                                "tokens_train": int(train_src.size)}},
                     {"name": "fineweb10B_sp8192", "tokenizer_name": "sp_bpe_1024", "vocab_size": 8192,
                      "stats": {"files_train": 1, "files_val": 1}}],
    }
    (export / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    return write_repository(tmp_path_factory.mktemp("hf-repo"))


class RecordingRepository(LocalRepository):
    """The local source, remembering which files it was asked for (to see what a resume refetches)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.requested: list[str] = []

    def fetch(self, remote_path: str, destination: Path) -> None:
        self.requested.append(remote_path)
        super().fetch(remote_path, destination)


def quiet(message: str) -> None:
    """Fetch progress is not under test."""


def test_fetch_lays_out_a_directory_the_loader_runs_from(repository, tmp_path):
    out = tmp_path / "data"
    report = fetch_fineweb(LocalRepository(repository), out, "sp1024", train_shards=2, log=quiet)
    assert sorted(p.name for p in out.glob("fineweb_*.bin")) == [
        "fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_val_000000.bin"]
    assert report.tokenizer == out / "fineweb_1024_bpe.model" and report.vocab_size == 1024
    assert not list(out.glob("*.part"))
    ds = load_dataset(out, None, 1024)  # no tokenizer given: the dataset manifest names it
    assert ds.tokenizer_path == out / "fineweb_1024_bpe.model"
    assert len(ds.train_files) == 2 and ds.byte_source == "lut" and ds.lossless
    remote_val = shards.read_shard(repository / "datasets" / "datasets" / DATASET / "fineweb_val_000000.bin")
    np.testing.assert_array_equal(ds.val_tokens, remote_val)
    assert report.manifest["tokens_val"] == remote_val.size and report.manifest["dataset"] == DATASET


def test_a_rerun_skips_complete_files_and_refetches_broken_ones(repository, tmp_path):
    out = tmp_path / "data"
    fetch_fineweb(LocalRepository(repository), out, "sp1024", train_shards=2, log=quiet)
    again = RecordingRepository(repository)
    report = fetch_fineweb(again, out, "sp1024", train_shards=2, log=quiet)
    assert again.requested == [] and report.fetched == [] and len(report.skipped) == 4
    broken = out / "fineweb_train_000001.bin"
    broken.write_bytes(broken.read_bytes()[:-7])  # an interrupted copy
    (out / "fineweb_1024_bpe.model").write_bytes(b"not a model")
    more = RecordingRepository(repository)
    report = fetch_fineweb(more, out, "sp1024", train_shards=3, log=quiet)
    assert sorted(report.fetched) == ["fineweb_1024_bpe.model", "fineweb_train_000001.bin", "fineweb_train_000002.bin"]
    assert len(more.requested) == 3 and shards.read_header(broken) > 0


def test_a_bad_remote_file_never_lands_under_its_name(repository, tmp_path):
    bad_repo = tmp_path / "repo"
    shutil.copytree(repository, bad_repo)
    shard = bad_repo / "datasets" / "datasets" / DATASET / "fineweb_train_000001.bin"
    raw = bytearray(shard.read_bytes())
    raw[0:4] = (123).to_bytes(4, "little")
    shard.write_bytes(bytes(raw))
    out = tmp_path / "data"
    with pytest.raises(DataError, match="bad magic"):
        fetch_fineweb(LocalRepository(bad_repo), out, "sp1024", train_shards=2, log=quiet)
    assert not (out / "fineweb_train_000001.bin").exists() and not list(out.glob("*.part"))
    assert (out / "fineweb_train_000000.bin").is_file()  # what was good stays, for the resume


def test_a_manifest_that_is_not_json_is_reported(tmp_path):
    bad_repo = tmp_path / "repo"
    (bad_repo / "datasets").mkdir(parents=True)
    (bad_repo / "datasets" / "manifest.json").write_text("<html>rate limited</html>")
    with pytest.raises(DataError, match="manifest.json from local:.* is not valid JSON"):
        fetch_fineweb(LocalRepository(bad_repo), tmp_path / "data", "sp1024", train_shards=1, log=quiet)
    assert [p.name for p in (tmp_path / "data").iterdir()] == [".fetch.lock"]  # nothing half-fetched


def test_token_ids_beyond_the_vocabulary_are_rejected(repository, tmp_path):
    bad_repo = tmp_path / "repo"
    shutil.copytree(repository, bad_repo)
    shards.write_shard(bad_repo / "datasets" / "datasets" / DATASET / "fineweb_train_000000.bin", [1, 5, 4000])
    with pytest.raises(DataError, match="out of range for vocab size 1024"):
        fetch_fineweb(LocalRepository(bad_repo), tmp_path / "data", "sp1024", train_shards=1, log=quiet)


@pytest.mark.parametrize(
    ("variant", "train_shards", "message"),
    [
        ("sp1024", TRAIN_SHARDS + 1, "has 3 training shards; 4 were requested"),
        ("sp4096", 1, "has no dataset fineweb10B_sp4096"),
        ("byte260", 1, "unsupported variant"),
        ("sp8192", 1, "has 1024 pieces but the manifest lists fineweb10B_sp8192 with vocab size 8192"),
        ("sp1024", -1, "zero or more"),
    ],
)
def test_mistakes_are_reported_before_or_while_fetching(repository, tmp_path, variant, train_shards, message):
    with pytest.raises(DataError, match=message):
        fetch_fineweb(LocalRepository(repository), tmp_path / "data", variant, train_shards=train_shards, log=quiet)


def test_two_exports_never_mix_in_one_directory(repository, tmp_path):
    out = tmp_path / "data"
    fetch_fineweb(LocalRepository(repository), out, "sp1024", train_shards=1, log=quiet)
    with pytest.raises(DataError, match="already holds fineweb10B_sp1024"):
        fetch_fineweb(LocalRepository(repository), out, "sp8192", train_shards=1, log=quiet)


def test_the_hub_source_without_huggingface_hub_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # what an environment without the extra sees
    with pytest.raises(DataError, match=r'pip install -e "\.\[fineweb\]"'):
        HubRepository()
    with pytest.raises(DataError, match=r"fineweb"):
        source_for("willdepueoai/parameter-golf", None)


@pytest.mark.slow
def test_cli_fetch_then_run_needs_no_tokenizer_flag(repository, tmp_path):
    out = tmp_path / "fineweb"
    proc = pgolf("data", "fineweb", "--variant", "sp1024", "--train-shards", "1", "--local-repo", str(repository),
                 "--out", str(out))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "run with: pgolf run recipes/best.yaml --data" in proc.stdout
    run_dir = tmp_path / "run"
    proc = pgolf("run", "recipes/baseline.yaml", "--scale", "tiny", "--data", str(out), "--steps", "1",
                 *micro_flags(), "--out", str(run_dir))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["data"]["tokenizer"] == str(out / "fineweb_1024_bpe.model")
    assert manifest["data"]["source"] == "shards" and manifest["data"]["train_shards"] == 1


def test_cli_without_huggingface_hub_says_how_to_install_it(tmp_path):
    body = ("import sys; sys.modules['huggingface_hub'] = None; from pgolf.cli import main; "
            f"sys.argv = ['pgolf', 'data', 'fineweb', '--out', {str(tmp_path / 'data')!r}]; main()")
    proc = subprocess.run([sys.executable, "-c", body], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert 'pip install -e ".[fineweb]"' in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "data").exists()
