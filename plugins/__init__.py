"""pgolf's built-in techniques, one module each; installed as the import package `pgolf_plugins`.

`BUILTINS` maps a technique's recipe name to ``module:Class``. Nothing here is imported until a
recipe names the technique; third-party techniques register the same way through the entry
point group ``pgolf.techniques``.
"""

BUILTINS: dict[str, str] = {
    "ppm": "pgolf_plugins.ppm:PPM",
    "sliding_window": "pgolf_plugins.sliding_window:SlidingWindow",
    "ttt": "pgolf_plugins.ttt:TTT",
}
