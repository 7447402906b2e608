"""pgolf's built-in techniques, one module each; installed as the import package `pgolf_plugins`.

`BUILTINS` maps a technique's recipe name to ``module:Class``. Nothing here is imported until a
recipe names the technique; third-party techniques register the same way through the entry
point group ``pgolf.techniques``.
"""

BUILTINS: dict[str, str] = {
    "asym_logit": "pgolf_plugins.asym_logit:AsymLogit",
    "attn_out_gate": "pgolf_plugins.attn_gates:AttnOutGate",
    "awq_lite": "pgolf_plugins.awq_lite:AWQLite",
    "bigram_hash": "pgolf_plugins.bigram_hash:BigramHash",
    "casefold": "pgolf_plugins.casefold:Casefold",
    "codec": "pgolf_plugins.codec:Codec",
    "doc_isolation": "pgolf_plugins.doc_isolation:DocIsolation",
    "ema": "pgolf_plugins.ema:EMA",
    "freq_weighting": "pgolf_plugins.freq_weighting:FreqWeighting",
    "gated_attn": "pgolf_plugins.attn_gates:GatedAttn",
    "gptq": "pgolf_plugins.gptq:GPTQ",
    "leaky_relu": "pgolf_plugins.leaky_relu:LeakyRelu",
    "lqer": "pgolf_plugins.lqer:LQER",
    "muon_eq_r": "pgolf_plugins.muon_eq_r:MuonEqR",
    "muon_wd": "pgolf_plugins.muon_wd:MuonWD",
    "ngram_tilt": "pgolf_plugins.ngram_tilt:NgramTilt",
    "orthogonal_init": "pgolf_plugins.orthogonal_init:OrthogonalInit",
    "parallel_residuals": "pgolf_plugins.parallel_residuals:ParallelResiduals",
    "partial_rope": "pgolf_plugins.partial_rope:PartialRope",
    "polar_express": "pgolf_plugins.polar_express:PolarExpress",
    "ppm": "pgolf_plugins.ppm:PPM",
    "progressive_context": "pgolf_plugins.progressive_context:ProgressiveContext",
    "qk_gain": "pgolf_plugins.qk_gain:QKGain",
    "quant_gate": "pgolf_plugins.quant_gate:QuantGate",
    "recurrence": "pgolf_plugins.recurrence:Recurrence",
    "sandwich_quant": "pgolf_plugins.sandwich_quant:SandwichQuant",
    "sdclip": "pgolf_plugins.sdclip:SDClip",
    "skip_gates": "pgolf_plugins.skip_gates:SkipGates",
    "sliding_window": "pgolf_plugins.sliding_window:SlidingWindow",
    "smear_gate": "pgolf_plugins.smear_gate:SmearGate",
    "sparse_attn_gate": "pgolf_plugins.attn_gates:SparseAttnGate",
    "ttt": "pgolf_plugins.ttt:TTT",
    "warmdown": "pgolf_plugins.warmdown:Warmdown",
    "wd_taper": "pgolf_plugins.wd_taper:WDTaper",
    "xsa": "pgolf_plugins.xsa:XSA",
}
