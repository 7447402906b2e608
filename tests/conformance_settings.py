"""Per-technique settings for the conformance suite (Composer's algorithm_settings pattern).

Every registered technique runs the conformance tests in test_conformance.py on a micro run.
A technique whose defaults cannot run at micro scale (layer indices, chunk sizes) adds an
entry here: `params` for its recipe section, `overrides` for other recipe keys, and
`invalid_audits` for modes that exist to be rejected (the audits must fail exactly those).
"""

from __future__ import annotations

from typing import Any

SETTINGS: dict[str, dict[str, Any]] = {
    # The default (lossless CaseOps) mode must pass every audit; the lossy `lowercase` mode is
    # the intentionally invalid one (tests/test_casefold.py checks it fails byte_accounting only).
    "casefold": {"params": {"mode": "caseops"}, "invalid_audits": ()},
}


def settings_for(name: str) -> dict[str, Any]:
    entry = SETTINGS.get(name, {})
    return {"params": entry.get("params", {}), "overrides": entry.get("overrides", []),
            "invalid_audits": set(entry.get("invalid_audits", ()))}
