"""`pgolf records import` on records folders written in the layouts of three eras of the challenge
(March, mid-April, late April), from figures read from the real records (tests/data/records_folders.json,
with tests/data/leaderboard_submissions.json for the PRs' submission.json figures), then `pgolf stats`
on the stored arms reproducing p-values of frontier.md §2.2 and challenge.md §1.2."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from scipy import stats as sps
from typer.testing import CliRunner

import pgolf
from pgolf.cli import app
from pgolf.errors import PgolfError
from pgolf.study import record_store
from pgolf.study.records import import_records, parse_train_log
from tests.conftest import REPO, cli_imports_torch

DATA = json.loads((REPO / "tests" / "data" / "records_folders.json").read_text(encoding="utf-8"))["records"]
LEADERBOARD = json.loads((REPO / "tests" / "data" / "leaderboard_submissions.json").read_text(encoding="utf-8"))
OKEZUE = LEADERBOARD["reproductions"]["1855-okezue"]["seeds"]  # PR #1855 comment: the pooled arm's other 3 seeds
SEPARATOR = "=" * 100

# A training script as many logs print it before the run (March: at the very top; late April: after `Source code:`).
# Its docstring and format strings look like the lines a parser reads; none of them may count.
SCRIPT = '''"""A training script. At the end it prints, for example:

final_int8_zlib_roundtrip_exact val_loss:9.99999999 val_bpb:9.99999999
stopping_early: wallclock_cap train_time:1ms step:1/2
model_params:1
"""
import os

SEED = int(os.environ.get("SEED", 1337))


def report(log, ms, step, total, size, loss, bpb):
    log(f"stopping_early: wallclock_cap train_time:{ms:.0f}ms step:{step}/{total}")
    log(f"Total submission size int8+zlib: {size} bytes")
    log(f"final_int8_zlib_roundtrip_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}")
'''.splitlines()


def _split(fig: dict[str, Any]) -> tuple[list[list[str]], list[list[str]]]:
    """The figure's score lines before and after quantization."""
    pre = [e for e in fig["evals"] if "pre-quant" in e[0]]
    return pre, [e for e in fig["evals"] if e not in pre]


def march_log(fig: dict[str, Any], source: bool) -> tuple[str, dict[str, str]]:
    """The March layout (e.g. 2026-03-18_LongContextSeq2048/train_seed1338.log); with `source`, the script first
    as in 2026-03-19_Seq2048_FP16Emb_TunedLR's logs."""
    hp, seed, it, ms, steps = fig["hyperparameters"], fig["seed"], fig["iterations"], fig["train_time_ms"], fig["steps"]
    head = [*SCRIPT, SEPARATOR, "Running Python 3.12.3", SEPARATOR] if source else [
        "", "*****************************************", "Setting OMP_NUM_THREADS environment variable for each "
        "process to be 1 in default", "*****************************************"]
    lines = [
        *head, f"logs/seq2048_seed{seed}.txt",
        "val_bpb:enabled tokenizer_kind=sentencepiece tokenizer_path=./data/tokenizers/fineweb_1024_bpe.model",
        "train_loader:dataset:fineweb10B_sp1024 train_shards:80",
        f"val_loader:shards pattern=./data/datasets/fineweb10B_sp1024/fineweb_val_*.bin tokens:{fig['val_tokens']}",
        f"model_params:{fig['model_params']}", "world_size:8 grad_accum_steps:1",
        "sdp_backends:cudnn=False flash=True mem_efficient=False math=False",
        f"attention_mode:gqa num_heads:{hp['num_heads']} num_kv_heads:{hp['num_kv_heads']}",
        f"tie_embeddings:{hp['tie_embeddings']} embed_lr:{hp['embed_lr']} head_lr:0.0 matrix_lr:{hp['matrix_lr']} "
        f"scalar_lr:{hp['matrix_lr']}",
        f"train_batch_tokens:{hp['train_batch_tokens']} train_seq_len:{hp['train_seq_len']} iterations:{hp['iterations']} "
        f"warmup_steps:{hp['warmup_steps']} max_wallclock_seconds:{hp['max_wallclock_seconds']}",
        f"seed:{seed}", "warmup_step:1/20", "warmup_step:20/20",
        f"step:0/{it} val_loss:6.9357 val_bpb:4.1077 train_time:0ms step_avg:0.02ms",
        f"step:1000/{it} train_loss:2.2909 train_time:51717ms step_avg:51.72ms",
        f"step:{steps}/{it} val_loss:2.0269 val_bpb:1.2005 train_time:{ms}ms step_avg:51.89ms",
        f"stopping_early: wallclock_cap train_time:{ms}ms step:{steps}/{it}",
        "peak memory allocated: 10247 MiB reserved: 10488 MiB", "Serialized model: 67224983 bytes",
        "Code size: 47716 bytes", "Total submission size: 67272699 bytes",
        f"Total submission size {fig['artifact_label']}: {fig['artifact_bytes']} bytes",
        *(f"{name} val_loss:{loss} val_bpb:{bpb}" + ("" if name.endswith("_exact") else " eval_time:1639ms")
          for name, loss, bpb in fig["evals"])]
    hyper = {"train_loader": "dataset:fineweb10B_sp1024", "train_shards": "80", "model_params": str(fig["model_params"]),
             "world_size": "8", "grad_accum_steps": "1", "attention_mode": "gqa", "head_lr": "0.0",
             "scalar_lr": hp["matrix_lr"], **hp, "seed": str(seed)}
    return "\n".join(lines) + "\n", hyper


def april_log(fig: dict[str, Any], source: bool) -> tuple[str, dict[str, str]]:
    """The mid-April layout (2026-04-09_SP8192_3LayerRecur_ParResid_QK525_LegalTTT, 2026-04-09_A2_Muon097_3Seed)."""
    del source  # these logs print no script
    hp = {**fig["hyperparameters"], "seed": str(fig["seed"])}
    it, ms, steps = fig["iterations"], fig["train_time_ms"], fig["steps"]
    pre, post = _split(fig)
    *others, (final, loss, bpb) = post
    lines = [
        "W0409 04:38:18.092000 206 torch/distributed/run.py:803] ", "Hyperparameters:",
        *(f"  {k}: {v}" for k, v in sorted(hp.items())),
        "train_shards: 128", f"val_tokens: {fig['val_tokens']}", f"model_params:{fig['model_params']}",
        "gptq:reserving 12s, effective=588000ms", "warmup_step: 1/20", "warmup_step: 20/20",
        f"0/{it} val_loss: 9.0090 val_bpb: 3.4877", f"500/{it} train_loss: 3.3346 train_time: 0.9m tok/s: 7691255",
        f"{steps}/{it} val_loss: 2.8119 val_bpb: 1.0886",
        f"stopping_early: wallclock_cap train_time: {ms}ms step: {steps}/{it}",
        "peak memory allocated: 39045 MiB reserved: 39124 MiB", "ema:applying EMA weights",
        *(f"{name} val_loss:{lo} val_bpb:{b} eval_time:7440ms" for name, lo, b in pre),
        "Serialized model: 135431033 bytes", "Code size: 16630 bytes",
        f"Total submission size {fig['artifact_label']}: {fig['artifact_bytes']} bytes",
        *(f"{name} val_loss:{lo} val_bpb:{b} eval_time:25515ms" for name, lo, b in others),
        "ttt_sliding:start chunks=1238 chunk_tokens=32768 total_windows=633409 stride=64 ttt_lr=0.005",
        "  ttt_chunk [1/1238] bpb=1.160313 time=0.3s",
        f"ttt_sliding:done val_loss={float(loss):.6f} val_bpb={float(bpb):.6f} elapsed=341.6s",
        f"{final} val_loss:{loss} val_bpb:{bpb} eval_time:341841ms"]
    hyper = {**hp, "train_shards": "128", "val_tokens": str(fig["val_tokens"]),
             "model_params": str(fig["model_params"])}
    return "\n".join(lines) + "\n", hyper


def late_log(fig: dict[str, Any], source: bool) -> tuple[str, dict[str, str]]:
    """The late-April layout (2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611 and
    2026-04-29_SmearGateBOSFix_3Seed_1.06141, whose reruns print the script after `Source code:`)."""
    hp = {**fig["hyperparameters"], "seed": str(fig["seed"])}
    it, ms, steps = fig["iterations"], fig["train_time_ms"], fig["steps"]
    pre, post = _split(fig)
    *others, (final, loss, bpb) = post
    lines = [
        SEPARATOR, "Hyperparameters:", *(f"  {k}: {v}" for k, v in sorted(hp.items())), SEPARATOR,
        *(["Source code:", SEPARATOR, *SCRIPT, SEPARATOR] if source else []),
        "Running Python 3.12.3 (main, Mar  3 2026, 12:15:18) [GCC 13.3.0]", "Running PyTorch 2.11.0+cu128", SEPARATOR,
        "train_shards: 80", f"val_tokens: {fig['val_tokens']}", f"model_params:{fig['model_params']}",
        "gptq:reserving 0s, effective=599500ms", "warmup_cu_buckets:64,128,192,256 iters_each:3", "warmup_step: 1/20",
        "loop_warmup_step: 1/20", f"0/{it} val_loss: 9.0076 val_bpb: 4.1159",
        f"500/{it} train_loss: 2.5705 train_time: 0.8m tok/s: 8341171", f"{steps}/{it} val_loss: 2.3541 val_bpb: 1.0757",
        f"stopping_early: wallclock_cap train_time: {ms}ms step: {steps}/{it}", "ema:applying EMA weights",
        *(f"{name} val_loss:{lo} val_bpb:{b} eval_time:7779ms" for name, lo, b in pre),
        "Serialized model: 135417533 bytes", "Code size (uncompressed): 151766 bytes",
        "Code size (compressed): 31250 bytes", f"Total submission size {fig['artifact_label']}: {fig['artifact_bytes']} bytes",
        *(f"{name} val_loss:{lo} val_bpb:{b} eval_time:63234ms" for name, lo, b in others),
        "ttt_lora:warming up compile (random tokens, no val data)", "", "beginning TTT eval timer",
        "ttp: b782/782 bl:2.1403 bb:1.0135 rl:2.1403 rb:1.0135 dl:30339-97114 gd:0",
        "tttg: c1/131 lr:0.001000 t:0.3s", "ttpr: phase:1/3 t:236.2s",
        f"{final} val_loss:{loss} val_bpb:{bpb} eval_time:519546ms", "total_eval_time:519.5s"]
    hyper = {**hp, "train_shards": "80", "val_tokens": str(fig["val_tokens"]), "model_params": str(fig["model_params"]),
             "warmup_cu_buckets": "64,128,192,256", "iters_each": "3"}
    return "\n".join(lines) + "\n", hyper


WRITERS = {"march": march_log, "april": april_log, "late": late_log}
PRINTS_SOURCE = {"train.log", "train_seed314_original.log", "train_seed1234_original.log",
                 "train_seed42_rerun_gptq8s.log", "train_seed314_rerun_gptq8s.log", "train_seed1234_rerun_gptq8s.log"}


def submission_of(key: str) -> dict[str, Any]:
    record = DATA[key]
    scores = LEADERBOARD["submissions"][key]["submission"] if key in LEADERBOARD["submissions"] else {}
    return {**record["submission"], **scores}


def write_folder(root: Path, key: str) -> tuple[Path, dict[str, dict[str, str]]]:
    """The record's folder where the challenge keeps it; returns it and the hyperparameters each log prints."""
    record = DATA[key]
    folder = root / record["path"]
    folder.mkdir(parents=True)
    (folder / "submission.json").write_text(json.dumps(submission_of(key), indent=2), encoding="utf-8")
    mention = f"Figures of PR #{record['pr']}." if record["pr"] else "Figures of the March record."
    (folder / "README.md").write_text(f"# {record['submission']['name']}\n\n{mention}\n", encoding="utf-8")
    (folder / "train_gpt.py").write_text("\n".join(SCRIPT) + "\n", encoding="utf-8")
    printed = {}
    for name, fig in record["logs"].items():
        text, printed[name] = WRITERS[record["era"]](fig, name in PRINTS_SOURCE)
        (folder / name).write_text(text, encoding="utf-8")
    return folder, printed


@pytest.fixture
def parameter_golf(tmp_path: Path) -> Path:
    return tmp_path / "parameter-golf"


def records(*args: str) -> Any:
    return CliRunner().invoke(app, ["records", *args])


def import_json(folder: Path, store: Path, *args: str) -> dict[str, Any]:
    result = records("import", str(folder), "--store", str(store), "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def stats_json(*args: str) -> dict[str, Any]:
    result = CliRunner().invoke(app, ["stats", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def assert_user_error(result: Any, *phrases: str) -> None:
    """Exit 2 with one paragraph naming the problem, no traceback."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    text = " ".join(result.stderr.split())
    assert text.startswith("error:") and "Traceback" not in result.output, result.output
    for phrase in phrases:
        assert phrase in text, (phrase, text)


# --- every figure, in each era's layout ------------------------------------------------------------------


@pytest.mark.parametrize("key", list(DATA))
def test_every_figure_is_read_in_each_eras_layout(parameter_golf: Path, tmp_path: Path, key: str):
    folder, printed = write_folder(parameter_golf, key)
    record = DATA[key]
    args = ["--name", key] + (["--pr", str(record["pr"])] if record["pr"] else [])
    before = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    arm = import_json(folder, tmp_path / "store", *args)

    assert arm["format"] == record_store.FORMAT and arm["name"] == key and arm["warnings"] == []
    runs = {run["file"]: run for run in arm["runs"]}
    assert list(runs) == sorted(record["logs"])
    for name, fig in record["logs"].items():
        run = runs[name]
        evals = [{"name": n, "val_loss": float(lo), "val_bpb": float(b), "val_bpb_text": b, "prequant": "pre-quant" in n}
                 for n, lo, b in fig["evals"]]
        assert run["evals"] == evals and run["final"] == evals[-1]
        assert run["hyperparameters"] == printed[name]
        assert (run["seed"], run["seed_from"], run["file_seed"]) == (fig["seed"], "log",
                                                                    None if name == "train.log" else fig["seed"])
        assert (run["model_params"], run["val_tokens"]) == (fig["model_params"], fig["val_tokens"])
        assert (run["steps"], run["iterations"], run["train_time_ms"], run["stopped_early"]) == (
            fig["steps"], fig["iterations"], float(fig["train_time_ms"]), True)
        assert (run["artifact_bytes"], run["artifact_label"]) == (fig["artifact_bytes"], fig["artifact_label"])
        assert run["same_file_as"] is None
        assert run["sha256"] == hashlib.sha256((folder / name).read_bytes()).hexdigest()

    submission = submission_of(key)
    assert arm["submission"] == submission
    if key == "longctx":  # one headline val_bpb: the logs are the arm, the headline is seed 1337's run
        logs = sorted(record["logs"].values(), key=lambda f: f["seed"])
        assert arm["arm"]["scores"] == [float(f["evals"][-1][2]) for f in logs]
        assert arm["arm"]["seeds"] == [1337, 1338, 1339] and arm["arm"]["from"] == "logs"
        ratios = [float(f["evals"][-1][2]) * 0.6931471805599453 / float(f["evals"][-1][1]) for f in logs]
        assert arm["arm"]["tokens_per_byte"] == pytest.approx(sum(ratios) / 3, rel=1e-12)
        assert all(run["matches"] == [] for run in arm["runs"])
    else:
        results = submission.get("seed_results") or submission.get("seeds")
        assert arm["arm"]["seeds"] == [int(s) for s in results] and arm["arm"]["from"] == "submission.json"
        assert arm["arm"]["scores"] == [r["val_bpb"] for r in results.values()]
        for run in arm["runs"]:
            assert run["matches"] == (["submission.json@compliance_rerun"] if "rerun" in run["file"]
                                      else ["submission.json"])
    assert list(arm["blocks"]) == (["compliance_rerun"] if key == "1868" else [])

    prov = arm["provenance"]
    assert prov["source"] == str(folder.resolve()) and prov["folder"] == record["folder"]
    assert prov["date"] == record["folder"][:10] and prov["name"] == record["folder"][11:]
    mentioned = {"1868": [1851, 1868]}.get(key, [record["pr"]] if record["pr"] else [])  # #1868's title names #1851
    assert prov["pr"] == record["pr"] and prov["readme_prs"] == mentioned
    assert prov["readme_title"] == record["submission"]["name"] and prov["pgolf_version"] == pgolf.__version__
    imported = dt.datetime.fromisoformat(prov["imported_at"])
    assert before <= imported <= dt.datetime.now(dt.timezone.utc)
    roles = {"submission.json": "submission", "README.md": "readme", "train_gpt.py": "code",
             **{name: "log" for name in record["logs"]}}
    assert {f["path"]: f["role"] for f in prov["files"]} == roles
    for entry in prov["files"]:
        data = (folder / entry["path"]).read_bytes()
        assert (entry["bytes"], entry["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())


def test_the_import_prints_the_arm_and_each_run(parameter_golf: Path, tmp_path: Path):
    folder, _ = write_folder(parameter_golf, "1868")
    result = records("import", str(folder), "--store", str(tmp_path / "store"), "--name", "pr1868")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"stored record:pr1868 -> {tmp_path / 'store' / 'pr1868.json'}"
    assert lines[1] == ("arm: 3 score(s) from submission.json: 42:1.06128183, 314:1.06086831, 1234:1.06220261; "
                        "mean 1.06145092")
    assert "blocks: record:pr1868@compliance_rerun (3 scores)" in lines
    assert ("  train_seed42_rerun_gptq8s.log: seed 42, 4942/20000 steps, 592.1 s, 35,945,671 params, "
            "15,949,701 bytes, quantized_ttt_phased val_bpb 1.06083288, = submission.json@compliance_rerun") in lines


# --- pgolf stats on stored arms -------------------------------------------------------------------------


@pytest.fixture
def store(parameter_golf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Every record imported into the store `record:NAME` reads ($PGOLF_RECORDS_DIR); name -> folder."""
    monkeypatch.setenv(record_store.STORE_ENV, str(tmp_path / "store"))
    folders = {}
    for key in DATA:
        folders[key], _ = write_folder(parameter_golf, key)
        pr = ["--pr", str(DATA[key]["pr"])] if DATA[key]["pr"] else []
        result = records("import", str(folders[key]), "--name", key, *pr)
        assert result.exit_code == 0, result.output
    return folders


def test_stats_reads_stored_arms_and_reproduces_1514_vs_1493(store: dict[str, Path]):
    result = stats_json("--new", "record:1514", "--old", "record:1493")
    assert abs(result["test"]["p_value"] - 0.0204) <= 0.00005  # frontier.md §2.2: per-seed Welch, printed 0.020
    scores = {pr: [r["val_bpb"] for r in (submission_of(pr).get("seed_results") or submission_of(pr)["seeds"]).values()]
              for pr in ("1514", "1493")}
    direct = sps.ttest_ind(scores["1514"], scores["1493"], equal_var=False, alternative="less")
    assert result["test"]["p_value"] == direct.pvalue
    assert result["new"]["sources"] == ["record:1514"] and result["old"]["sources"] == ["record:1493"]
    by_folder = stats_json("--new", str(store["1514"]), "--old", str(store["1493"]))
    assert by_folder["test"] == result["test"]  # the stored arm is the folder's submission, figure for figure


def test_stats_pools_1855_with_its_reproduction_against_the_1868_rerun_block(store: dict[str, Path]):
    okezue = ",".join(f"{seed}:{score}" for seed, score in OKEZUE.items())
    result = stats_json("--new", "record:1855", "--new", okezue, "--old", "record:1868@compliance_rerun")
    assert result["new"]["n"] == 6 and result["old"]["n"] == 3
    assert abs(result["test"]["p_value"] - 0.1882) <= 0.00005  # frontier.md §2.2 (PR #1902), printed 0.188
    rerun = [r["val_bpb"] for r in submission_of("1868")["compliance_rerun"]["seed_results"].values()]
    assert result["old"]["scores"] == rerun
    plain = stats_json("--new", "record:1855", "--old", "record:1868")
    assert any("record:1868 also holds 'compliance_rerun'" in note for note in plain["notes"])
    assert_user_error(CliRunner().invoke(app, ["stats", "--new", "record:1855", "--old", "record:1868@rerun"]),
                      "the stored arm has no block 'rerun'", "Its blocks with scores: compliance_rerun")


def test_stats_tests_the_march_logs_against_the_threshold(store: dict[str, Path], tmp_path: Path):
    """challenge.md §1.2: LongContextSeq2048's three seeds against 1.2193657: t=31.42 (one-sided), p=0.00051."""
    result = stats_json("--new", "record:longctx", "--method", "one-sample", "--threshold", "1.2193657")
    assert abs(result["test"]["p_value"] - 0.00051) <= 0.000005 and abs(result["test"]["t"] + 31.42) <= 0.005
    assert result["new"]["scores"] == [1.20576485, 1.2061746, 1.20715923]
    assert result["tokens_per_byte_from"] == "val_bpb * ln 2 / val_loss of record:longctx"
    by_path = stats_json("--new", f"record:{tmp_path / 'store' / 'longctx.json'}", "--method", "one-sample",
                         "--threshold", "1.2193657")
    assert by_path["test"] == result["test"]


def test_records_list(store: dict[str, Path], tmp_path: Path):
    listed = json.loads(records("list", "--json").stdout)
    assert listed["store"] == str(tmp_path / "store")
    rows = {row["name"]: row for row in listed["arms"]}
    assert list(rows) == sorted(DATA)
    assert rows["1868"]["blocks"] == ["compliance_rerun"] and rows["1868"]["pr"] == 1868
    assert rows["longctx"]["from"] == "logs" and rows["longctx"]["n"] == 3
    assert rows["1514"]["mean_val_bpb"] == pytest.approx(1.07983273, abs=5e-9)
    text = records("list").stdout
    assert "record:1514" in text and "1.07983273" in text and "#1868" in text


def test_stats_with_a_stored_arm_does_not_import_torch(store: dict[str, Path]):
    assert not cli_imports_torch("stats", "--new", "record:1514", "--old", "record:1493", "--json")


# --- cross-checks: disagreements are warnings kept in the arm -------------------------------------------


def test_a_seed_without_a_log_is_a_warning(parameter_golf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    folder, _ = write_folder(parameter_golf, "1493")
    (folder / "train_seed999.log").unlink()
    arm = import_json(folder, tmp_path / "store", "--name", "pr1493")
    assert arm["warnings"] == ["seed 999 of submission.json (val_bpb 1.08118) has no train log"]
    monkeypatch.setenv(record_store.STORE_ENV, str(tmp_path / "store"))
    judged = stats_json("--new", "record:pr1493", "--old", "1.09,1.091,1.092")
    assert "record:pr1493: at import: seed 999 of submission.json (val_bpb 1.08118) has no train log" in judged["notes"]


def test_a_final_score_that_differs_is_a_warning_naming_the_line_that_agrees(parameter_golf: Path, tmp_path: Path):
    folder, _ = write_folder(parameter_golf, "1514")
    log = folder / "train_seed42.log"
    log.write_text(log.read_text() + "legal_ttt_rescored val_loss:2.79000000 val_bpb:1.08000000 eval_time:1ms\n")
    arm = import_json(folder, tmp_path / "store", "--name", "pr1514")
    assert arm["warnings"] == [
        "seed 42 of submission.json (val_bpb 1.07996676): no train log prints it to print precision; "
        "train_seed42.log ends with legal_ttt_rescored val_bpb 1.08000000 (it prints 1.07996676 under legal_ttt_exact)"]
    assert arm["arm"]["scores"] == [1.07928348, 1.07996676, 1.08024795]  # the arm is still the submission's


def test_print_precision_decides_agreement(parameter_golf: Path, tmp_path: Path):
    """#1493 states 5 digits (1.08079) for a log's 1.08079352: equal to print precision; 1.08081 is not."""
    folder, _ = write_folder(parameter_golf, "1493")
    submission = json.loads((folder / "submission.json").read_text())
    submission["seed_results"]["42"]["val_bpb"] = 1.08081
    (folder / "submission.json").write_text(json.dumps(submission))
    arm = import_json(folder, tmp_path / "store", "--name", "pr1493")
    assert [w.split(":")[0] for w in arm["warnings"]] == ["seed 42 of submission.json (val_bpb 1.08081)"]


def test_a_log_whose_seed_contradicts_its_name_and_an_unlisted_seed(parameter_golf: Path, tmp_path: Path):
    """As 2026-04-18_PR1626_CaseOps_Taper/train_seed0.log, which prints seed 1337 (its score is seed 0's)."""
    folder, _ = write_folder(parameter_golf, "1855")
    (folder / "train_seed0.log").rename(folder / "train_seed7.log")
    stray = (folder / "train_seed42.log").read_text().replace("  seed: 42", "  seed: 5").replace(
        "val_bpb:1.05989454", "val_bpb:1.05555555")
    (folder / "train_seed5.log").write_text(stray)
    arm = import_json(folder, tmp_path / "store", "--name", "pr1855")
    assert arm["warnings"] == [
        "train_seed7.log: prints seed 0 but its file name says seed 7",
        "train_seed5.log is a run of seed 5, which submission.json does not list (seeds 42, 0, 1234)"]
    runs = {run["file"]: run for run in arm["runs"]}
    assert runs["train_seed7.log"]["matches"] == ["submission.json"] and runs["train_seed5.log"]["matches"] == []


def test_identical_logs_are_read_once(parameter_golf: Path, tmp_path: Path):
    """As 2026-03-21_11L_XSA4_EMA_PartialRoPE_LateQAT_1.1248, whose train.log is train_seed2025.log."""
    folder, _ = write_folder(parameter_golf, "longctx")
    shutil.copy(folder / "train_seed1338.log", folder / "train_seed1338_copy.log")
    arm = import_json(folder, tmp_path / "store", "--name", "longctx")
    assert arm["arm"]["scores"] == [1.20576485, 1.2061746, 1.20715923] and arm["warnings"] == []
    assert "train_seed1338_copy.log is the same file as train_seed1338.log" in arm["notes"]


# --- the parser on real log quirks ------------------------------------------------------------------------


def test_log_quirks_of_the_records(tmp_path: Path):
    """Epoch-time prefixes (2026-04-13_VarLenAttn_PhasingTTT2000/logs/train0.txt), a `stride:64` between name and
    scores (2026-03-19_MixedQuant_Int6Int8_SlidingWindow), `model_params:N (...)` (2026-03-19_SlidingWindowEval)."""
    log = tmp_path / "logs" / "train0.txt"
    log.parent.mkdir()
    log.write_text("\n".join([
        "1776142360.538 Hyperparameters:", "1776142360.538   seed: 0", "1776142360.540 val_tokens: 47851520",
        "1776142360.541 model_params:35945671 (unique_layers:9 loops:1 effective_depth:9)",
        "1776142361.000 warmup_step: 1/20", "1776144156.001 final_int6_roundtrip_exact val_loss:2.02025601 val_bpb:1.19650941",
        "1776144156.999 final_sliding_window_eval_exact stride:64 val_loss:1.96369923 val_bpb:1.16301431", ""]))
    run = parse_train_log(log, "logs/train0.txt")
    assert (run.seed, run.seed_from, run.file_seed) == (0, "log", None)
    assert (run.val_tokens, run.model_params) == (47851520, 35945671)
    assert (run.final.name, run.final.val_bpb, run.final.val_loss) == ("final_sliding_window_eval_exact", 1.16301431,
                                                                       1.96369923)
    assert (run.steps, run.train_time_ms, run.artifact_bytes) == (None, None, None)


def test_the_printed_script_never_counts(tmp_path: Path):
    log = tmp_path / "train_seed1.log"
    log.write_text("\n".join([*SCRIPT, SEPARATOR, "seed:1", "model_params:17059912", "step:10/20 train_loss:2.0",
                              "final_int8_zlib_roundtrip_exact val_loss:2.07269931 val_bpb:1.22436570", ""]))
    run = parse_train_log(log, log.name)
    assert [e.val_bpb for e in run.evals] == [1.2243657] and run.steps == 10 and run.model_params == 17059912
    assert run.hyperparameters == {"seed": "1", "model_params": "17059912"}


# --- bad input: one paragraph, exit 2, nothing written ----------------------------------------------------


def test_a_folder_with_neither_submission_nor_logs(tmp_path: Path):
    folder = tmp_path / "2026-05-01_Empty"
    folder.mkdir()
    (folder / "README.md").write_text("# nothing yet\n")
    result = records("import", str(folder), "--store", str(tmp_path / "store"))
    assert_user_error(result, str(folder), "neither a submission.json nor a train log found", "This folder holds: README.md")
    assert not (tmp_path / "store").exists()
    assert_user_error(records("import", str(tmp_path / "missing")), "no such folder")
    assert_user_error(records("import", str(folder / "README.md")), "not a records folder")


def test_a_log_without_final_metrics(parameter_golf: Path, tmp_path: Path):
    folder, _ = write_folder(parameter_golf, "1855")
    log = folder / "train_seed0.log"
    log.write_text(log.read_text().split("Serialized model:")[0])  # cut off after the float model's score
    store = tmp_path / "store"
    store.mkdir()
    result = records("import", str(folder), "--store", str(store))
    assert_user_error(result, str(log), "no final metrics", "it has only diagnostic pre-quantization post-ema",
                      "The run may have been cut off")
    assert list(store.iterdir()) == []


def test_a_headline_figure_without_logs(tmp_path: Path):
    """A March submission.json states one val_bpb; without its logs there are no per-seed scores to read."""
    folder = tmp_path / DATA["longctx"]["folder"]
    folder.mkdir()
    (folder / "submission.json").write_text(json.dumps(DATA["longctx"]["submission"]))
    result = records("import", str(folder), "--store", str(tmp_path / "store"))
    assert_user_error(result, str(folder / "submission.json"),
                      "no val_bpb scores found, and the folder has no train log to take them from")


def test_a_truncated_submission_json(parameter_golf: Path, tmp_path: Path):
    folder, _ = write_folder(parameter_golf, "1514")
    file = folder / "submission.json"
    file.write_text(file.read_text()[:200])
    result = records("import", str(folder), "--store", str(tmp_path / "store"))
    assert_user_error(result, str(file), "not valid JSON")
    assert not (tmp_path / "store").exists()


def test_a_submission_with_null_scores(parameter_golf: Path, tmp_path: Path):
    """As PR #2135's first submission.json, which held null figures beside complete logs."""
    folder, _ = write_folder(parameter_golf, "1855")
    submission = json.loads((folder / "submission.json").read_text())
    submission["seed_results"]["42"]["val_bpb"] = None
    (folder / "submission.json").write_text(json.dumps(submission))
    result = records("import", str(folder), "--store", str(tmp_path / "store"))
    assert_user_error(result, "seed_results.42.val_bpb", "expected a finite val_bpb number, found null")


def test_names_are_checked_and_never_silently_replaced(parameter_golf: Path, tmp_path: Path):
    store = tmp_path / "store"
    first, _ = write_folder(parameter_golf, "1493")
    second, _ = write_folder(parameter_golf, "1514")
    assert_user_error(records("import", str(first), "--store", str(store), "--name", "../x"), "'../x' cannot name")
    assert import_json(first, store, "--name", "arm")["provenance"]["folder"] == DATA["1493"]["folder"]
    assert import_json(first, store, "--name", "arm")["provenance"]["folder"] == DATA["1493"]["folder"]  # same files
    assert_user_error(records("import", str(second), "--store", str(store), "--name", "arm"),
                      "a stored arm named 'arm' already exists, imported from other files", "--replace")
    assert import_json(second, store, "--name", "arm", "--replace")["provenance"]["folder"] == DATA["1514"]["folder"]
    default = import_json(second, store)
    assert default["name"] == DATA["1514"]["folder"]


def test_a_crash_while_writing_leaves_nothing(parameter_golf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    folder, _ = write_folder(parameter_golf, "1493")
    store = tmp_path / "store"

    def crash(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(record_store.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        import_records(folder, name="pr1493", store=store)
    assert list(store.iterdir()) == []


# --- a stored arm is verified when read --------------------------------------------------------------------


def test_a_damaged_arm_is_a_clear_error(parameter_golf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    store = tmp_path / "store"
    monkeypatch.setenv(record_store.STORE_ENV, str(store))
    for key in ("1493", "1514"):
        folder, _ = write_folder(parameter_golf, key)
        import_json(folder, store, "--name", key)
    edited = store / "1514.json"
    payload = json.loads(edited.read_text())
    payload["arm"]["scores"][0] = 1.07
    edited.write_text(json.dumps(payload, indent=2))
    result = CliRunner().invoke(app, ["stats", "--new", "record:1514", "--old", "record:1493"])
    assert_user_error(result, str(edited), "the stored arm is damaged: its contents do not match its own SHA-256",
                      "--replace")
    truncated = store / "1493.json"
    truncated.write_text(truncated.read_text()[:100])
    assert_user_error(CliRunner().invoke(app, ["stats", "--new", "record:1493", "--old", "1.0,1.1"]),
                      "the stored arm is damaged: not valid JSON")
    listed = json.loads(records("list", "--json").stdout)["arms"]
    assert [(row["name"], row["status"]) for row in listed] == [("1493", "damaged"), ("1514", "damaged")]
    assert "damaged" in records("list").stdout
    assert_user_error(CliRunner().invoke(app, ["stats", "--new", "record:nothing", "--old", "1.0,1.1"]),
                      "no such stored arm", "pgolf records import")


def test_read_arm_rejects_another_format(tmp_path: Path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"format": "something-else/1"}))
    with pytest.raises(PgolfError, match="not a stored arm of format pgolf-record/1"):
        record_store.read_arm(path)
