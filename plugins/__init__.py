"""pgolf's built-in techniques, one module each; installed as the import package `pgolf_plugins`.

`BUILTINS` maps a technique's recipe name to ``module:Class``. Nothing here is imported until a
recipe names the technique; third-party techniques register the same way through the entry
point group ``pgolf.techniques``.
"""

BUILTINS: dict[str, str] = {
    "casefold": "pgolf_plugins.casefold:Casefold",
    "codec": "pgolf_plugins.codec:Codec",
    "freq_weighting": "pgolf_plugins.freq_weighting:FreqWeighting",
    "gptq": "pgolf_plugins.gptq:GPTQ",
    "ppm": "pgolf_plugins.ppm:PPM",
    "sandwich_quant": "pgolf_plugins.sandwich_quant:SandwichQuant",
    "sdclip": "pgolf_plugins.sdclip:SDClip",
    "sliding_window": "pgolf_plugins.sliding_window:SlidingWindow",
    "ttt": "pgolf_plugins.ttt:TTT",
}
