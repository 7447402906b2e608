"""Fetching the challenge's cached FineWeb export: shards and tokenizer, checked and resumable.

The challenge publishes its tokenized FineWeb as a Hugging Face dataset repository
(``willdepueoai/parameter-golf``). Under a root prefix (``datasets``) it holds a
``manifest.json`` that lists every dataset (``fineweb10B_sp1024``: shard counts under
``stats``, the ``tokenizer_name``) and every tokenizer (``model_path``, relative to the root),
the shards at ``datasets/<dataset>/fineweb_{val,train}_NNNNNN.bin`` and the SentencePiece
models under ``tokenizers/``.

`fetch_fineweb` copies the whole validation split, the first N training shards (a prefix of
the same frozen shuffled export, so the data order matches the baseline) and the tokenizer
into one flat directory, checks every file as it arrives (shard header and size, token ids
below the vocabulary, the tokenizer's vocabulary size), and writes the pgolf dataset manifest
naming the tokenizer, so ``pgolf run --data DIR`` needs no ``--tokenizer``. Files already
complete are skipped, and a file is only ever moved under its final name once checked, so an
interrupted fetch resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from pgolf.data import shards
from pgolf.data.dataset import file_lock
from pgolf.data.textdata import write_manifest
from pgolf.data.tokenizer import load_tokenizer
from pgolf.errors import DataError

DEFAULT_REPO_ID = "willdepueoai/parameter-golf"
DEFAULT_REMOTE_ROOT = "datasets"
DEFAULT_TRAIN_SHARDS = 80  # the challenge downloader's default: 8B training tokens
REMOTE_MANIFEST = "manifest.json"
SOURCE_FILE = "fineweb_source.json"  # where this directory's files came from, and the remote manifest
INSTALL_HINT = 'Install the optional extra with: pip install -e ".[fineweb]" (or pip install huggingface_hub).'


class FileSource(Protocol):
    """Where the export lives: copies one file, named relative to the repository root."""

    description: str

    def fetch(self, remote_path: str, destination: Path) -> None:
        """Write the file `remote_path` to `destination` (a temporary name the caller checks)."""
        ...


@dataclass
class LocalRepository:
    """A directory laid out like the dataset repository (a clone, a mirror, or a test fixture)."""

    root: Path

    @property
    def description(self) -> str:
        return f"local:{Path(self.root).resolve()}"

    def fetch(self, remote_path: str, destination: Path) -> None:
        source = Path(self.root) / PurePosixPath(remote_path)
        if not source.is_file():
            raise DataError(f"{remote_path} is not in the local repository {self.root}",
                            hint="Point --local-repo at the directory that holds the export's root "
                                 f"(the one containing {DEFAULT_REMOTE_ROOT}/{REMOTE_MANIFEST}).")
        shutil.copyfile(source, destination)


@dataclass
class HubRepository:
    """A Hugging Face dataset repository, read through huggingface_hub's download cache."""

    repo_id: str = DEFAULT_REPO_ID
    revision: str | None = None
    _download: Callable[..., str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        try:
            from huggingface_hub import hf_hub_download
        except ImportError:
            raise DataError("fetching from the Hugging Face Hub needs the huggingface_hub package, which is not "
                            "installed", hint=INSTALL_HINT + " Or pass --local-repo DIR to copy from a local "
                            "copy of the dataset repository.") from None
        self._download = hf_hub_download

    @property
    def description(self) -> str:
        return f"hf:{self.repo_id}" + (f"@{self.revision}" if self.revision else "")

    def fetch(self, remote_path: str, destination: Path) -> None:
        try:
            cached = Path(self._download(repo_id=self.repo_id, filename=remote_path, repo_type="dataset",
                                         revision=self.revision))
        except Exception as exc:  # network, authentication or a missing file: all fixable by the user
            raise DataError(f"could not download {remote_path} from {self.description}: {type(exc).__name__}: {exc}",
                            hint="Check the network, --repo-id and --remote-root; a rerun resumes where this stopped.") from None
        blob = cached.resolve(strict=True)  # the cache holds symlinks into its blob store
        try:
            os.link(blob, destination)  # no second copy of multi-GB shards when the cache shares the disk
        except OSError:
            shutil.copyfile(blob, destination)


@dataclass
class FetchReport:
    """What a fetch produced: the directory, its tokenizer, and which files moved."""

    dir: Path
    tokenizer: Path
    vocab_size: int
    fetched: list[str]
    skipped: list[str]
    manifest: dict[str, Any]


def dataset_name(variant: str) -> str:
    """'sp1024' -> 'fineweb10B_sp1024' (the challenge's naming)."""
    if not re.fullmatch(r"sp\d+", variant):
        raise DataError(f"unsupported variant '{variant}'",
                        hint="pgolf reads SentencePiece exports: use sp1024, sp8192 or another sp<VOCAB> the export has.")
    return f"fineweb10B_{variant}"


def _remote(root: str, *parts: str) -> str:
    return "/".join(p.strip("/") for p in (root, *parts) if p.strip("/"))


def _shard_ok(path: Path) -> bool:
    """A shard is complete when its header is valid and its size matches the token count."""
    try:
        shards.read_header(path)
    except DataError:
        return False
    return True


def _tokenizer_ok(path: Path, vocab_size: int) -> bool:
    try:
        load_tokenizer(path, vocab_size)
    except DataError:
        return False
    return True


def _load_source_record(out: Path, source: FileSource, remote_root: str, dataset: str) -> dict[str, Any] | None:
    """The remote manifest fetched earlier into `out`, refusing to mix two exports in one directory."""
    path = out / SOURCE_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    theirs = (record.get("source"), record.get("remote_root"), record.get("dataset"))
    ours = (source.description, remote_root, dataset)
    if theirs != ours:
        raise DataError(f"{out} already holds {theirs[2]} from {theirs[0]} (root '{theirs[1]}'), not {dataset} "
                        f"from {ours[0]} (root '{remote_root}')",
                        hint="Use a separate --out directory per variant and source, so shards of different "
                             "tokenizers never mix.")
    return record


def _fetch_checked(source: FileSource, remote_path: str, destination: Path, check: Callable[[Path], None]) -> None:
    """Fetch to a temporary name, check it, then move it into place (never a bad file under the name)."""
    partial = destination.with_name(destination.name + ".part")
    partial.unlink(missing_ok=True)
    try:
        source.fetch(remote_path, partial)
        check(partial)
        os.replace(partial, destination)
    finally:
        partial.unlink(missing_ok=True)


def _fetch_source_record(out: Path, source: FileSource, remote_root: str, dataset: str) -> dict[str, Any]:
    """Fetch the export's manifest.json and keep it in `out`, with where it came from."""
    remote = _remote(remote_root, REMOTE_MANIFEST)
    staged = out / (SOURCE_FILE + ".manifest")

    def parse(path: Path) -> None:
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{remote} from {source.description} is not valid JSON ({exc})") from None

    _fetch_checked(source, remote, staged, parse)
    record = {"source": source.description, "remote_root": remote_root, "dataset": dataset,
              "manifest": json.loads(staged.read_text(encoding="utf-8"))}
    staged.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(staged, out / SOURCE_FILE)
    return record


def fetch_fineweb(
    source: FileSource,
    out_dir: str | Path,
    variant: str = "sp1024",
    train_shards: int = DEFAULT_TRAIN_SHARDS,
    remote_root: str = DEFAULT_REMOTE_ROOT,
    log: Callable[[str], None] = print,
) -> FetchReport:
    """Fetch the validation split, the first `train_shards` training shards and the tokenizer."""
    dataset = dataset_name(variant)
    if train_shards < 0:
        raise DataError(f"--train-shards must be zero or more, got {train_shards}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with file_lock(out / ".fetch.lock"):
        record = _load_source_record(out, source, remote_root, dataset) or _fetch_source_record(
            out, source, remote_root, dataset)
        remote_manifest = record["manifest"]
        entry = next((d for d in remote_manifest.get("datasets", []) if d.get("name") == dataset), None)
        if entry is None:
            names = sorted(str(d.get("name")) for d in remote_manifest.get("datasets", []))
            raise DataError(f"{source.description} has no dataset {dataset}",
                            hint=f"Its manifest lists: {', '.join(names) or 'nothing'}.")
        stats = entry.get("stats") or {}
        files_train, files_val = int(stats.get("files_train", 0)), int(stats.get("files_val", 0))
        if files_val <= 0:
            raise DataError(f"the manifest of {source.description} lists no validation shards for {dataset}")
        if train_shards > files_train:
            raise DataError(f"{dataset} on {source.description} has {files_train} training shards; "
                            f"{train_shards} were requested", hint=f"Use --train-shards {files_train} or fewer.")
        tok_name = entry.get("tokenizer_name")
        tok_entry = next((t for t in remote_manifest.get("tokenizers", []) if t.get("name") == tok_name), None)
        if tok_entry is None or not tok_entry.get("model_path"):
            raise DataError(f"the manifest of {source.description} has no SentencePiece model for tokenizer "
                            f"'{tok_name}' of {dataset}")
        vocab_size = int(entry.get("vocab_size") or tok_entry.get("vocab_size") or variant[2:])

        def check_shard(path: Path) -> None:
            shards.read_shard(path, vocab_size)  # header, size and every token id below the vocabulary

        def check_tokenizer(path: Path) -> None:
            pieces = int(load_tokenizer(path).vocab_size())
            if pieces != vocab_size:
                raise DataError(f"the tokenizer {tok_remote} has {pieces} pieces but the manifest lists {dataset} with "
                                f"vocab size {vocab_size}", hint="The export's manifest and tokenizer disagree; check "
                                "--repo-id and --remote-root.")

        tok_remote = _remote(remote_root, str(tok_entry["model_path"]))
        tok_path = out / PurePosixPath(tok_remote).name
        plan: list[tuple[str, Path, Callable[[Path], None], Callable[[Path], bool]]] = [
            (tok_remote, tok_path, check_tokenizer, lambda p: _tokenizer_ok(p, vocab_size))]
        for split, count in (("val", files_val), ("train", train_shards)):
            for i in range(count):
                name = shards.shard_name(split, i)
                plan.append((_remote(remote_root, "datasets", dataset, name), out / name, check_shard, _shard_ok))
        fetched, skipped = [], []
        for n, (remote, dest, check, complete) in enumerate(plan, 1):
            if dest.is_file() and complete(dest):
                skipped.append(dest.name)
                continue
            _fetch_checked(source, remote, dest, check)
            fetched.append(dest.name)
            log(f"[{n}/{len(plan)}] {dest.name} ({dest.stat().st_size / 1e6:,.1f} MB)")
        val_tokens = sum(shards.read_header(out / shards.shard_name("val", i)) for i in range(files_val))
        expected_val = stats.get("tokens_val")
        if expected_val is not None and int(expected_val) != val_tokens:
            raise DataError(f"the validation shards hold {val_tokens} tokens but the manifest says {expected_val}",
                            hint=f"Delete {out}/fineweb_val_*.bin and fetch again.")
        present = shards.list_shards(out, shards.TRAIN_GLOB)
        manifest = {
            "source": "fineweb",
            "origin": source.description,
            "remote_root": remote_root,
            "dataset": dataset,
            "vocab_size": vocab_size,
            "tokenizer": tok_path.name,
            "transform": None,
            "lossless": True,
            "train_shards": len(present),
            "val_shards": files_val,
            "tokens_val": val_tokens,
            "tokens_train": sum(shards.read_header(p) for p in present),
        }
        write_manifest(out, manifest)
    return FetchReport(out, tok_path, vocab_size, fetched, skipped, manifest)


def source_for(repo_id: str, local_repo: Path | None, revision: str | None = None) -> FileSource:
    """The Hub repository by default; a local copy of it when `local_repo` is given."""
    if local_repo is not None:
        if not Path(local_repo).is_dir():
            raise DataError(f"--local-repo {local_repo} is not a directory")
        return LocalRepository(Path(local_repo))
    return HubRepository(repo_id, revision)
