"""Validity audits: each one passes honest runs and catches the leak it exists for."""

from __future__ import annotations

import numpy as np
import pytest

from pgolf import compliance
from pgolf.data.dataset import DataLedger
from pgolf.scores import TokenScores, plain_windows


def scores_with_probe(logp: np.ndarray, target: int) -> TokenScores:
    tokens = np.array([0, target])
    s = TokenScores.empty(tokens, np.ones(2, dtype=np.int32))
    s.windows = plain_windows(2, 1)
    s.add(np.array([1]), np.array([-logp[target]]), s.tick())
    s.probes[1] = logp
    return s


def test_normalization_passes_a_distribution_and_fails_a_non_distribution():
    logp = np.log(np.array([0.1, 0.2, 0.3, 0.4]))
    assert compliance.normalization(scores_with_probe(logp, 2))["passed"]
    inflated = np.log(np.array([0.1, 0.2, 0.6, 0.4]))  # sums to 1.3
    result = compliance.normalization(scores_with_probe(inflated, 2))
    assert not result["passed"] and result["detail"]["max_abs_sum_error"] == pytest.approx(0.3)


def test_normalization_fails_when_the_score_is_not_the_distributions_value():
    logp = np.log(np.array([0.25, 0.25, 0.25, 0.25]))
    s = scores_with_probe(logp, 1)
    s.nll[1] -= 0.5  # a score better than its own distribution allows
    assert not compliance.normalization(s)["passed"]


def test_normalization_needs_probes():
    s = TokenScores.empty(np.zeros(3, dtype=np.int64), np.ones(3, dtype=np.int32))
    assert not compliance.normalization(s)["passed"]


def test_score_before_update():
    s = TokenScores.empty(np.zeros(100, dtype=np.int64), np.ones(100, dtype=np.int32))
    t1 = s.tick()
    s.add(np.arange(1, 51), np.ones(50), t1)
    s.record_update(1, 51, s.tick())  # trains on what was scored: legal
    assert compliance.score_before_update(s, weights_changed=True)["passed"]
    s.record_update(40, 80, s.tick())  # 51..79 not scored yet: illegal
    result = compliance.score_before_update(s, weights_changed=True)
    assert not result["passed"] and result["detail"]["violations"][0]["first_unscored_target"] == 51


def test_update_in_the_same_tick_as_scoring_is_illegal():
    s = TokenScores.empty(np.zeros(10, dtype=np.int64), np.ones(10, dtype=np.int32))
    t = s.tick()
    s.record_update(1, 5, t)
    s.add(np.arange(1, 5), np.ones(4), t)
    assert not compliance.score_before_update(s, weights_changed=True)["passed"]


def test_weights_changing_without_recorded_updates_fails():
    s = TokenScores.empty(np.zeros(10, dtype=np.int64), np.ones(10, dtype=np.int32))
    assert not compliance.score_before_update(s, weights_changed=True)["passed"]
    assert compliance.score_before_update(s, weights_changed=False)["passed"]


def test_document_hashes_identify_equal_documents_anywhere():
    a = np.array([1, 5, 6, 7, 1, 8, 9, 1, 5, 6, 7])
    h = compliance.document_hashes(a, 1)
    assert h.size == 3 and h[0] == h[2] and h[0] != h[1]
    shifted = np.concatenate([[1, 4, 4], a])
    assert set(compliance.document_hashes(shifted, 1)[1:]) == set(h)
    assert compliance.document_hashes(np.array([1, 5, 6]), 1)[0] != compliance.document_hashes(np.array([1, 5, 6, 0]), 1)[0]


class FakeDataset:
    def __init__(self, val):
        self.val_tokens = np.array(val)
        self.bos_id = 1


def test_no_val_leakage_catches_validation_reads_and_shared_documents():
    ledger = DataLedger()
    ledger.record("eval", _p("fineweb_val_000000.bin"))
    ledger.record("train", _p("fineweb_train_000000.bin"))
    ds = FakeDataset([1, 5, 6, 1, 7, 8])
    assert compliance.no_val_leakage(ledger, ds, np.array([1, 9, 9, 1, 4]))["passed"]
    leaked = compliance.no_val_leakage(ledger, ds, np.array([1, 9, 1, 7, 8, 1, 3]))
    assert not leaked["passed"] and leaked["detail"]["val_docs_found_in_train"] == 1
    ledger.record("calibration", _p("fineweb_val_000000.bin"))
    result = compliance.no_val_leakage(ledger, ds, None)
    assert not result["passed"] and "calibration" in result["detail"]["validation_reads_outside_eval"]


def _p(name):
    from pathlib import Path

    return Path("/data") / name


def test_time_and_byte_budgets():
    assert compliance.time_budget(599.9, 600, 10, 600)["passed"]
    assert not compliance.time_budget(600.1, 600, 10, 600)["passed"]
    assert not compliance.time_budget(1, 600, 601, 600)["passed"]
    assert compliance.byte_budget(16_000_000, 16_000_000)["passed"]
    assert not compliance.byte_budget(16_000_001, 16_000_000)["passed"]


def test_byte_accounting_rejects_lossy_transforms():
    class DS:
        byte_source, transform, lossless = "sidecar", "lowercase", False

    assert not compliance.byte_accounting(DS())["passed"]
    DS.lossless, DS.transform, DS.byte_source = True, "casefold", "lut"
    assert not compliance.byte_accounting(DS())["passed"]
    DS.byte_source = "sidecar"
    assert compliance.byte_accounting(DS())["passed"]
