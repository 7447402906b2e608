"""Per-technique settings for the conformance suite (Composer's algorithm_settings pattern).

Every registered technique runs the conformance tests in test_conformance.py on a micro run.
A technique whose defaults cannot run at micro scale (layer indices, chunk sizes) adds an
entry here: `params` for its recipe section, `overrides` for other recipe keys, and
`invalid_audits` for modes that exist to be rejected (the audits must fail exactly those).
`variants` names further settings of the same technique that get their own micro run (a second
mode, an intentionally invalid mode).
"""

from __future__ import annotations

from typing import Any

SETTINGS: dict[str, dict[str, Any]] = {
    # micro runs score 4,096 targets with 64-token sequences: chunks of 1,024 give four chunks
    "ttt": {
        "params": {"chunk_tokens": 1024},
        "variants": {
            "lora": {"params": {"mode": "lora", "lora_rank": 8, "lora_chunk": 32}},
            "phased": {"params": {"mode": "lora", "lora_rank": 8, "phases": 2, "prefix_docs": 4, "chunk_tokens": 512}},
        },
    },
    # the byte-level mixture of the rejected PRs: its token scores are not a distribution
    "ppm": {"variants": {"bytes": {"params": {"mode": "bytes"}, "invalid_audits": ["normalization"]}}},
    # The default (lossless CaseOps) mode must pass every audit; the lossy `lowercase` mode is
    # the intentionally invalid one (tests/test_casefold.py checks it fails byte_accounting only).
    "casefold": {"params": {"mode": "caseops"}, "invalid_audits": ()},
    # 16 calibration micro-batches (#1626) work at micro scale but take most of the run; 2 still collect
    # every Hessian (self-generated calibration is covered in tests/test_gptq.py).
    "gptq": {"params": {"calibration_batches": 2}},
    # MICRO has 2 layers and 3 steps: loop both blocks, one pass from step 1 and two from step 2,
    # with untied MLPs so the round trip also covers the extra pass blocks.
    "recurrence": {"params": {"loop_start": 0, "loop_end": 1, "num_loops": 2, "enable_at": 0.3, "phase_at": [0.6],
                              "untie_mlp": True}},
    "parallel_residuals": {"params": {"start_layer": 1}},  # the decoder half of MICRO's 2 layers
}


def settings_for(name: str, variant: str | None = None) -> dict[str, Any]:
    entry = SETTINGS.get(name, {})
    if variant is not None:
        entry = entry["variants"][variant]
    return {"params": entry.get("params", {}), "overrides": entry.get("overrides", []),
            "invalid_audits": set(entry.get("invalid_audits", ()))}


def micro_cases(names: list[str]) -> list[tuple[str, str | None]]:
    """(technique, variant) pairs for the micro-run test: every technique, then its variants."""
    return [(name, None) for name in names] + [
        (name, variant) for name in names for variant in SETTINGS.get(name, {}).get("variants", {})]
