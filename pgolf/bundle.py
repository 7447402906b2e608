"""The submission's single `train_gpt.py`: the host, the enabled techniques and the resolved recipe in one file.

The challenge counts the bytes of the code a submission ships. That code is this file, built the
way the records build theirs: each module of the run's import closure (the host and the enabled
techniques, found by reading their imports; the CLI, the studies and the doctor stay out) is
minified with python-minifier, the sources and the recipe are joined into one program, and that
program is lzma-compressed and base85-encoded into a two-line loader. Run, it installs an
in-memory importer for the embedded modules (nothing is written to disk, nothing is unpickled)
and runs `pgolf.bundle_main`, which reads the challenge's environment variables (`DATA_PATH`,
`TOKENIZER_PATH`, `SEED`, `RUN_ID`, ...).

`code_bytes` is the size of exactly the file `pgolf export` writes for a recipe, from the same
`build_bundle`, so a run's reported total is its artifact plus that file. Builds are cached per
(sources, recipe) in the process; minified sources per source text, also on disk (the pgolf cache). Without python-minifier the
sources go in unminified and the bundle says so (`minified: False` and a note).
"""

from __future__ import annotations

import ast
import base64
import copy
import functools
import hashlib
import importlib.util
import json
import lzma
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, packages_distributions, version
from typing import Any

ENTRY_MODULE = "pgolf.bundle_main"  # what the bundle runs: the host behind the challenge's environment variables
HOST_ROOTS = ("pgolf", "pgolf_plugins")  # packages whose modules are embedded when the closure reaches them
# Modules the lifecycle imports only for tooling it never runs inside a submission: leaving them out
# keeps the closure to the run's code (an import of one there would fail loudly, not silently).
TOOLING = ("pgolf.cli", "pgolf.study", "pgolf.doctor", "pgolf.testing", "pgolf.data.fineweb",
           "pgolf.submission_export")
# Imported only to build a bundle, which a submission never does: not one of its requirements.
BUILD_ONLY_IMPORTS = ("python_minifier",)
LZMA_PRESET = 9 | lzma.PRESET_EXTREME
NO_MINIFIER_NOTE = ("python-minifier is not installed: the sources are embedded unminified, so the file (and the "
                    "counted code bytes) is larger than a submission's would be; pip install python-minifier")


@dataclass(frozen=True)
class Bundle:
    """One self-contained train_gpt.py and what it holds."""

    text: str  # the file's content (ASCII)
    modules: tuple[str, ...]  # embedded module names, in import-closure order
    imports: tuple[str, ...]  # top-level modules outside the bundle that its code imports (stdlib included)
    raw_bytes: int  # UTF-8 bytes of the embedded sources before minification
    minified: bool
    note: str | None = None  # why the bundle is not what a submission would ship, if it is not

    @property
    def size(self) -> int:
        return len(self.text.encode("ascii"))


# --- the import closure --------------------------------------------------------------------------


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _source_of(name: str) -> tuple[str, bool] | None:
    """(source, is_package) of an importable module, None when it is not a module."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    with open(spec.origin, encoding="utf-8") as handle:
        return handle.read(), spec.submodule_search_locations is not None


def _imported_names(tree: ast.AST, package: str) -> list[str]:
    """Every module an AST imports (function-level imports included, `if TYPE_CHECKING:` blocks not)."""
    names: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names.append(base)
            names.extend(f"{base}.{alias.name}" for alias in node.names)  # `from pgolf import compliance`
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


@functools.lru_cache(maxsize=1024)
def _imports_of(source: str, package: str) -> tuple[str, ...]:
    return tuple(_imported_names(ast.parse(source), package))


def import_closure(roots: Iterable[str], packages: Iterable[str]) -> tuple[dict[str, tuple[str, bool]], set[str]]:
    """The modules of `packages` that `roots` reach through their imports, with their sources, and
    the top-level names of everything else they import (stdlib and third party)."""
    packages = tuple(dict.fromkeys(packages))
    found: dict[str, tuple[str, bool]] = {}
    external: set[str] = set()
    pending = list(roots)
    while pending:
        name = pending.pop(0)
        if name in found or _under(name, TOOLING):
            continue
        if not _under(name, packages):
            external.add(name.split(".")[0])
            continue
        loaded = _source_of(name)
        if loaded is None:
            continue  # `from pkg import attribute`: not a module
        found[name] = loaded
        source, is_package = loaded
        parts = name.split(".")
        pending.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages run first
        pending.extend(_imports_of(source, name if is_package else ".".join(parts[:-1])))
    return found, external


def requirements_for(top_level: Iterable[str]) -> tuple[str, ...]:
    """`name==version` of the installed distributions providing these top-level imports (stdlib skipped):
    a bundle's requirements.txt."""
    providers = packages_distributions()
    out: dict[str, str] = {}
    for top in sorted(set(top_level) - set(sys.stdlib_module_names) - {"__future__", *BUILD_ONLY_IMPORTS}):
        for dist in providers.get(top, []):
            try:
                out.setdefault(dist.lower(), f"{dist}=={version(dist)}")
            except PackageNotFoundError:
                continue
    return tuple(out[k] for k in sorted(out))


# --- minify, join, compress -----------------------------------------------------------------------


@functools.lru_cache(maxsize=512)
def minify_source(source: str) -> str | None:
    """The module minified (docstrings, annotations of functions and locals' names go), or None when
    python-minifier is not installed. Class annotations stay: dataclasses are built from them.
    Results are kept on disk per source and minifier version, so a new process does not redo them."""
    try:
        import python_minifier
    except ImportError:
        return None
    from pgolf.data.corpus import cache_dir

    tag = getattr(python_minifier, "__version__", "") or version("python-minifier")
    path = cache_dir() / "minified" / f"{hashlib.sha256((tag + chr(0) + source).encode()).hexdigest()}.py"
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        pass
    small = python_minifier.minify(source, remove_literal_statements=True, rename_globals=False,
                                   remove_asserts=False, remove_debug=False)
    try:  # atomic: a concurrent process reads the whole file or none
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        tmp.write_text(small, encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs the time
    return small


# The program the loader decompresses and runs. M maps a module name to (is_package, source); R is
# the recipe and the steps per seed (JSON). The importer serves only those names, before any installed copy; `__file__` is a
# name under the bundle's own path, so nothing resolves to files that do not exist.
BOOTSTRAP = '''import sys,importlib.abc as A,importlib.util as U
class _B(A.MetaPathFinder,A.Loader):
 def find_spec(s,n,p=None,t=None):
  return U.spec_from_loader(n,s,is_package=M[n][0]) if n in M else None
 def create_module(s,spec):return None
 def exec_module(s,m):
  n=m.__name__;f=__file__+"/"+n.replace(".","/")+("/__init__.py" if M[n][0] else ".py");m.__file__=f
  exec(compile(M[n][1],f,"exec"),m.__dict__)
sys.meta_path.insert(0,_B())
import pgolf.bundle_main as _m
_m.main(R,__file__,{n:len(M[n][1].encode()) for n in M})
'''


def _join(modules: Mapping[str, tuple[str, bool]], program: Mapping[str, Any]) -> str:
    table = ",".join(f"{name!r}:({is_package},{source!r})" for name, (source, is_package) in modules.items())
    return f"M={{{table}}}\nR={json.dumps(program, sort_keys=True, separators=(',', ':'))!r}\n{BOOTSTRAP}"


def loader_text(program: str) -> str:
    """The two-line file: the program lzma-compressed, base85-encoded, executed on load."""
    packed = base64.b85encode(lzma.compress(program.encode("utf-8"), preset=LZMA_PRESET)).decode("ascii")
    return f'import lzma as L,base64 as B\nexec(L.decompress(B.b85decode("{packed}")))\n'


def technique_modules(recipe: Mapping[str, Any]) -> list[str]:
    """The modules of a recipe's enabled techniques (built-ins, entry points, or `module:Class`)."""
    from pgolf.registry import load_technique_class

    return sorted({load_technique_class(name).__module__ for name in (recipe.get("techniques") or {})})


def build_bundle(program: Mapping[str, Any]) -> Bundle:
    """The train_gpt.py that runs `program` (what `submission_program` makes of a resolved recipe)."""
    program = copy.deepcopy(dict(program))
    techniques = technique_modules(program["recipe"])
    packages = [*HOST_ROOTS, *(m.split(".")[0] for m in techniques)]
    modules, external = import_closure([ENTRY_MODULE, *techniques], packages)
    key = hashlib.sha256(json.dumps([sorted((n, s) for n, (s, _) in modules.items()), program],
                                    sort_keys=True).encode()).hexdigest()
    return _build_cached(key, tuple((n, s, p) for n, (s, p) in modules.items()), json.dumps(program),
                         tuple(sorted(external)))


@functools.lru_cache(maxsize=64)
def _build_cached(key: str, modules: tuple[tuple[str, str, bool], ...], program_json: str,
                  imports: tuple[str, ...]) -> Bundle:
    del key  # part of the cache key only
    minified = {name: (minify_source(source), is_package) for name, source, is_package in modules}
    ok = all(source is not None for source, _ in minified.values())
    embedded = {name: (small if ok and small is not None else source, is_package)
                for (name, source, is_package), (small, _) in zip(modules, minified.values(), strict=True)}
    text = loader_text(_join(embedded, json.loads(program_json)))
    return Bundle(text=text, modules=tuple(n for n, _, _ in modules), imports=imports,
                  raw_bytes=sum(len(s.encode("utf-8")) for _, s, _ in modules), minified=ok,
                  note=None if ok else NO_MINIFIER_NOTE)


# --- the recipe a submission embeds -----------------------------------------------------------


def submission_program(recipe: Mapping[str, Any], steps_by_seed: Mapping[int, int] | None = None,
                       keep_wallclock: bool = False) -> dict[str, Any]:
    """What the bundle embeds: the resolved recipe with its data paths left to DATA_PATH / TOKENIZER_PATH
    and, unless `keep_wallclock`, step-matched: no wallclock cap, and per seed the steps that seed's run
    reached (`ITERATIONS` for the `SEED` given), so the file reproduces each run on any hardware."""
    out = copy.deepcopy(dict(recipe))
    # labels are not code: a run and an ablation arm of the same recipe under other names count the same bytes
    out["name"], out["description"] = "train_gpt", ""
    out["data"] = {**(out.get("data") or {}), "dir": None, "tokenizer": None}
    steps = {str(seed): int(n) for seed, n in (steps_by_seed or {}).items() if n} if not keep_wallclock else {}
    if steps:
        own = steps.get(str(out.get("seed")), next(iter(steps.values())))
        out["train"] = {**(out.get("train") or {}), "iterations": own, "max_wallclock_seconds": 0}
    if len(set(steps.values())) == 1:  # one step count for every seed: the recipe's iterations say it
        steps = {}
    return {"recipe": out, "iterations_by_seed": steps}


@dataclass
class CodeBytes:
    """The code a run counts: the bundle's bytes, the raw sources', and what is in it."""

    compressed: int  # the size of the train_gpt.py pgolf export writes
    raw: int  # UTF-8 bytes of the embedded sources, unminified and uncompressed
    files: list[str]
    minified: bool
    note: str | None


# Inside a submission the code is the running file itself (`pgolf.bundle_main` sets it): its
# modules are not files that could be bundled again.
running_bundle: dict[str, Any] = {}


def code_bytes(recipe: Mapping[str, Any], steps: int | None = None) -> CodeBytes:
    """The code bytes a run of `recipe` reports: those of the file `pgolf export` writes for it
    (inside a submission, those of the file running)."""
    if running_bundle:
        return CodeBytes(compressed=os.path.getsize(running_bundle["path"]), raw=running_bundle["embedded_bytes"],
                         files=list(running_bundle["modules"]), minified=True,
                         note="counted from the running train_gpt.py; raw = its embedded (minified) sources")
    seed = recipe.get("seed")
    bundle = build_bundle(submission_program(recipe, {seed: steps} if steps and seed is not None else None))
    return CodeBytes(compressed=bundle.size, raw=bundle.raw_bytes, files=list(bundle.modules),
                     minified=bundle.minified, note=bundle.note)
