"""Per-technique settings for the conformance suite (Composer's algorithm_settings pattern).

Every registered technique runs the conformance tests in test_conformance.py on a micro run.
A technique whose defaults cannot run at micro scale (layer indices, chunk sizes) adds an
entry here: `params` for its recipe section, `overrides` for other recipe keys, and
`invalid_audits` for modes that exist to be rejected (the audits must fail exactly those).
`variants` names further settings of the same technique that get their own micro run (a second
mode, an intentionally invalid mode). `companions` enables the techniques a technique requires.
"""

from __future__ import annotations

from typing import Any

SETTINGS: dict[str, dict[str, Any]] = {
    # micro runs score 4,096 targets with 64-token sequences: chunks of 1,024 give four chunks
    "ttt": {
        "params": {"chunk_tokens": 1024},
        "variants": {
            # no Q/V (#1953), short documents in chunks of 8 (#2014's steps, sized to 64-token windows)
            "lora": {"params": {"mode": "lora", "lora_rank": 8, "lora_chunk": 32, "order": "stream",
                                "lora_targets": ["k", "o", "mlp", "head"], "lora_short_chunks": [[48, 8]]}},
            "phased": {"params": {"mode": "lora", "lora_rank": 8, "phases": 2, "prefix_docs": 4, "chunk_tokens": 512,
                                  "order": "stream"}},
            # the records' longest-first queue: score-first, but a score depends on later documents
            "records_order": {"params": {"mode": "lora", "lora_rank": 8, "phases": 1, "prefix_docs": 4,
                                         "chunk_tokens": 512, "order": "length"}, "invalid_audits": ["causality"]},
        },
    },
    # order 16 finds no repeated 15-token context in 4,096 micro targets: order 3 makes the tilt fire
    "ngram_tilt": {"params": {"order": 3, "threshold": 0.5}},
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
    # the taper scales Muon's weight decay, which the baseline leaves at 0 (muon_wd's value, #1493)
    "wd_taper": {"overrides": ["optim.muon_weight_decay=0.095"]},
    # MICRO's 3 steps (step fractions 0, 1/3, 2/3) and 64-token rows: 32 tokens, then 64 from step 2 with the
    # LR re-warmed over 2 steps (#2014: 1024/2048/3072 at 0.1/0.7/1.0, 32 steps)
    "progressive_context": {"params": {"schedule": "32@0.5,64@1.0", "rewarm_steps": 2}},
    # AWQ-lite ranks groups by gptq's calibration activations and widens only matrices below int8 (int6 by
    # sandwich_quant, as the records); MICRO's 64-wide matrices have one 64-column group, so groups of 32
    "awq_lite": {"params": {"group_size": 32}, "companions": {
        "gptq": {"calibration_batches": 2}, "sandwich_quant": {"outer_layers": 0, "middle_bits": 6, "embed_bits": 7}}},
    # MICRO's 2 heads: the dense gate's 2 x 64 weights are in the gate range (the sparse gate's 2 x 12 are not)
    "quant_gate": {"overrides": ["model.attn_gate=dense", "model.attn_gate_init_std=0.005"]},
}


def settings_for(name: str, variant: str | None = None) -> dict[str, Any]:
    entry = SETTINGS.get(name, {})
    if variant is not None:
        entry = entry["variants"][variant]
    return {"params": entry.get("params", {}), "overrides": entry.get("overrides", []),
            "invalid_audits": set(entry.get("invalid_audits", ())),
            "companions": SETTINGS.get(name, {}).get("companions", {})}


def techniques_for(name: str, variant: str | None = None) -> dict[str, Any]:
    """The recipe's techniques section of a micro case: the technique and the ones it requires."""
    s = settings_for(name, variant)
    return {name: s["params"], **s["companions"]}


def micro_cases(names: list[str]) -> list[tuple[str, str | None]]:
    """(technique, variant) pairs for the micro-run test: every technique, then its variants."""
    return [(name, None) for name in names] + [
        (name, variant) for name in names for variant in SETTINGS.get(name, {}).get("variants", {})]
