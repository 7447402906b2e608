"""Sliding-window evaluation: every target is scored with up to `seq_len - stride` tokens of context.

Windows of `seq_len` inputs start every `stride` tokens; the first window scores all its
targets, every later window scores only its last `stride` targets, so each target of the
stream is scored exactly once (the rule of PR #1394's eval, used by every SP8192 record). The
earlier code of PR #50 let its short tail windows re-score targets a previous window had
already scored; this rule has no such tail. Bytes come from the dataset's per-position counts,
which are the byte sidecar whenever the data has one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pgolf.api import EvalWindows, RunContext, Technique


def sliding_windows(num_tokens: int, seq_len: int, stride: int) -> EvalWindows:
    """Windows over a stream of `num_tokens` tokens (targets 1 .. num_tokens-1), each target once.

    Window k starts at k*stride and reads min(seq_len, total - start) inputs; window 0 scores
    from its first target, later windows from offset seq_len - stride, so consecutive windows
    score adjacent runs of `stride` targets and the last one ends exactly at the stream's end.
    """
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride must lie in [1, seq_len]; got stride={stride}, seq_len={seq_len}")
    total = num_tokens - 1  # number of targets
    if total <= 0:
        empty = np.zeros(0, dtype=np.int64)
        return EvalWindows(empty, empty.copy(), empty.copy(), seq_len)
    context = seq_len - stride
    # window k>0 scores targets (k-1)*stride + seq_len + 1 .. k*stride + seq_len; it exists while
    # its first scored target is still in the stream: k*stride + context < total
    count = max(1, -(-(total - context) // stride))
    starts = np.arange(count, dtype=np.int64) * stride
    lengths = np.minimum(starts + seq_len, total) - starts
    score_from = np.where(starts == 0, 0, context).astype(np.int64)
    return EvalWindows(starts, lengths, score_from, seq_len)


@dataclass
class SlidingWindowConfig:
    stride: int = 64  # EVAL_STRIDE of every sliding record
    seq_len: int | None = None  # window length; None = the recipe's eval.seq_len (train.seq_len)

    def validate(self) -> tuple[str, str] | None:
        if self.stride <= 0:
            return "stride", "stride must be a positive number of tokens"
        if self.seq_len is not None and self.seq_len < self.stride:
            return "seq_len", f"seq_len {self.seq_len} must be at least the stride {self.stride}"
        return None


class SlidingWindow(Technique):
    name = "sliding_window"
    summary = "Score with overlapping windows (stride 64) so every token sees a long context; each once."
    Config = SlidingWindowConfig
    stage = "eval"
    follows = "PR #50 (SlidingWindowEval, -0.032 bpb); exactly-once rule of PR #1394"

    def window_length(self, ctx: RunContext) -> int:
        return self.config.seq_len or ctx.recipe.eval_seq_len

    def pgolf_contribute_config_errors(self, ctx: RunContext) -> list[str]:
        length = self.window_length(ctx)
        if self.config.stride > length:
            return [f"sliding_window.stride {self.config.stride} exceeds the window length {length}; "
                    f"set techniques.sliding_window.stride to at most {length}."]
        return []

    def pgolf_provide_eval_windows(self, ctx: RunContext, num_tokens: int) -> EvalWindows:
        return sliding_windows(num_tokens, self.window_length(ctx), self.config.stride)
