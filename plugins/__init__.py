"""pgolf's built-in techniques, one module each; installed as the import package `pgolf_plugins`.

`BUILTINS` maps a technique's recipe name to ``module:Class``. Nothing here is imported until a
recipe names the technique; third-party techniques register the same way through the entry
point group ``pgolf.techniques``.
"""

BUILTINS: dict[str, str] = {
    "casefold": "pgolf_plugins.casefold:Casefold",
    "codec": "pgolf_plugins.codec:Codec",
    "ema": "pgolf_plugins.ema:EMA",
    "freq_weighting": "pgolf_plugins.freq_weighting:FreqWeighting",
    "gptq": "pgolf_plugins.gptq:GPTQ",
    "leaky_relu": "pgolf_plugins.leaky_relu:LeakyRelu",
    "muon_eq_r": "pgolf_plugins.muon_eq_r:MuonEqR",
    "muon_wd": "pgolf_plugins.muon_wd:MuonWD",
    "parallel_residuals": "pgolf_plugins.parallel_residuals:ParallelResiduals",
    "partial_rope": "pgolf_plugins.partial_rope:PartialRope",
    "ppm": "pgolf_plugins.ppm:PPM",
    "qk_gain": "pgolf_plugins.qk_gain:QKGain",
    "recurrence": "pgolf_plugins.recurrence:Recurrence",
    "sandwich_quant": "pgolf_plugins.sandwich_quant:SandwichQuant",
    "sdclip": "pgolf_plugins.sdclip:SDClip",
    "sliding_window": "pgolf_plugins.sliding_window:SlidingWindow",
    "smear_gate": "pgolf_plugins.smear_gate:SmearGate",
    "ttt": "pgolf_plugins.ttt:TTT",
    "warmdown": "pgolf_plugins.warmdown:Warmdown",
    "xsa": "pgolf_plugins.xsa:XSA",
}
