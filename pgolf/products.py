"""The typed products the host's stages hand each other, and how each is stored.

    train_stage  -> Checkpoint   final_model.pt (state dict) + train.json
    export_stage -> Artifact     artifact.pga (the counted bytes) + export.json
    eval_stage   -> Scored       result.json (the run's result) + manifest.json

Each product carries what the run needs downstream of it: its facts (`info`), the hook trace of
the stages that made it and the training data they read (`ledger`), so a stage run later from a
stored product (an ablation's cache, `pgolf eval`) judges the whole run. A run directory and a
cache entry hold the same files; reading checks every file and reports a damaged one as one
clear error.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pgolf.artifact import decode_artifact
from pgolf.errors import DataError
from pgolf.quant import QuantizedTensor

CHECKPOINT_FILE = "final_model.pt"
ARTIFACT_FILE = "artifact.pga"
RESULT_FILE = "result.json"
MANIFEST_FILE = "manifest.json"
TRAIN_INFO_FILE = "train.json"
EXPORT_INFO_FILE = "export.json"


def write_json(path: Path, payload: Any) -> None:
    """Atomic write: a crash never leaves a half-written file under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


Reader = Callable[[str], bytes]  # a file of a product by name: from a directory, or verified from the cache


def directory_reader(directory: Path) -> Reader:
    def read(name: str) -> bytes:
        try:
            return (Path(directory) / name).read_bytes()
        except FileNotFoundError:
            raise DataError(f"{Path(directory) / name} is missing", hint="Re-run the stage that writes it.") from None

    return read


def read_json(path: Path | str, required: tuple[str, ...] = (), read: Reader | None = None) -> dict[str, Any]:
    """A JSON object with the keys a product needs, or one clear DataError."""
    path = Path(path)
    raw = read(path.name) if read is not None else directory_reader(path.parent)(path.name)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} is damaged and cannot be read ({exc})", hint="Re-run the stage that wrote it.") from None
    missing = [k for k in required if not isinstance(data, dict) or k not in data]
    if missing:
        raise DataError(f"{path} is damaged: it lacks {', '.join(missing)}", hint="Re-run the stage that wrote it.")
    return data


def load_state_dict(path: Path, data: bytes | None = None) -> dict[str, torch.Tensor]:
    """A plain tensor state dict (never arbitrary pickles), or one clear DataError."""
    try:
        source = io.BytesIO(data) if data is not None else path
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated, foreign or unsafe files
        raise DataError(f"cannot read checkpoint {path}: {exc}", hint="Only plain tensor state dicts are loaded.") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"{path} is not a state dict of tensors", hint="Pass a final_model.pt saved by pgolf or train_gpt.py.")
    return state


@dataclass
class Checkpoint:
    """The trained (averaged) weights before quantization, and the training facts."""

    state: dict[str, torch.Tensor]
    info: dict[str, Any]  # steps, train_seconds, reserve_seconds, val_bpb_prequant, ...
    trace: dict[str, Any] = field(default_factory=dict)
    ledger: dict[str, list[str]] = field(default_factory=dict)

    def write(self, directory: Path, key: Any = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in self.state.items()}, directory / CHECKPOINT_FILE)
        write_json(directory / TRAIN_INFO_FILE, {"info": self.info, "trace": self.trace, "ledger": self.ledger,
                                                 "key": key})

    @classmethod
    def read(cls, directory: Path, read: Reader | None = None) -> Checkpoint:
        read = read or directory_reader(directory)
        stored = read_json(directory / TRAIN_INFO_FILE, ("info", "trace", "ledger"), read)
        state = load_state_dict(directory / CHECKPOINT_FILE, read(CHECKPOINT_FILE))
        return cls(state, stored["info"], stored["trace"], stored["ledger"])


@dataclass
class Artifact:
    """The counted artifact bytes, and the export facts (bytes, calibration time, quant notes)."""

    blob: bytes
    info: dict[str, Any]
    trace: dict[str, Any] = field(default_factory=dict)
    ledger: dict[str, list[str]] = field(default_factory=dict)

    def decode(self) -> tuple[dict[str, QuantizedTensor], dict[str, Any]]:
        """Verified tensors and metadata (a damaged artifact is one DataError)."""
        return decode_artifact(self.blob)

    def write(self, directory: Path, key: Any = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / ARTIFACT_FILE).write_bytes(self.blob)
        write_json(directory / EXPORT_INFO_FILE, {"info": self.info, "trace": self.trace, "ledger": self.ledger,
                                                  "key": key})

    @classmethod
    def read(cls, directory: Path, read: Reader | None = None) -> Artifact:
        read = read or directory_reader(directory)
        stored = read_json(directory / EXPORT_INFO_FILE, ("info", "trace", "ledger"), read)
        return cls(read(ARTIFACT_FILE), stored["info"], stored["trace"], stored["ledger"])

    @classmethod
    def from_file(cls, path: Path) -> Artifact:
        """A bare artifact.pga: its facts and trace come from its own (verified) metadata."""
        blob = directory_reader(Path(path).parent)(Path(path).name)
        _, meta = decode_artifact(blob)
        return cls(blob, {"calibration_seconds": float(meta.get("calibration_seconds", 0.0))},
                   meta.get("trace") or {}, {})


@dataclass
class Scored:
    """A run's judged result: scores, bytes, times, audits, validity (result.json's content)."""

    result: dict[str, Any]
    manifest: dict[str, Any]

    REQUIRED = ("val_bpb", "val_loss", "bytes_total", "valid", "compliance")

    def write(self, directory: Path) -> None:
        write_json(directory / MANIFEST_FILE, self.manifest)
        write_json(directory / RESULT_FILE, self.result)

    @classmethod
    def read(cls, directory: Path, read: Reader | None = None) -> Scored:
        return cls(read_json(directory / RESULT_FILE, cls.REQUIRED, read), read_json(directory / MANIFEST_FILE, (), read))
