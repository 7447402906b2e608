"""Studies: ablations of a recipe's techniques across seeds, judged by the leaderboard's tests.

One idea a module: `spec` (what to ablate: spec files and flags), `designs` (which arms a design
runs), `plan` (every arm and seed resolved and keyed, nothing trained), `cache` (verified,
content-addressed stage outputs), `jobs` (one stage output produced by the host's own stage
functions), `scheduler` (workers, retries, records, the summary), `ray_executor` (the same jobs as
Ray tasks on a cluster, the cache on shared storage), `report` (the ablation table),
`html` (the same as one self-contained page), `budget` (what a study will run and cost before it
starts, and when its verdicts are decided), `stats` (the significance tests), `judge` (a
submission judged by the tests the maintainers printed), `submissions` (per-seed scores from
comma lists, submission.json files, records folders and stored records), `records` (a challenge
records folder read into a stored arm) and `record_store` (stored arms, verified on every read).

The ablation directory::

    summary.json                   spec, arms, counts, every run's result, the statistics
    runs/<arm>-seed<seed>.json     one record per run (its result, or its error and stage)
    job_seconds.json               each finished job's wall time (what --plan projects from)
    cache/train/<key>/             final_model.pt (state dict) + train.json (info, hook trace, data
                                   reads) + metrics.jsonl (the training curve)
    cache/export/<key>/            artifact.pga + export.json
    cache/eval/<key>/              result.json + manifest.json
    cache/<stage>/<key>/checksums.json  every file's size and SHA-256 (a damaged entry is moved aside, redone)
    cache/<stage>/<key>.error.json a stage that failed (retried with --retry-failed)
    logs/<stage>-<key>.log         what each job printed
"""
