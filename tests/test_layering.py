"""The floors of ``src/moeprune`` as a test: imports only run down, no circles, no private names across files.

Read from the source with :mod:`ast` (nothing is imported). A *room* is a top-level module or subpackage
of ``moeprune`` (``moeprune.surgery.shards`` lives in the room ``surgery``); :data:`FLOORS` orders the
rooms from the ground up, and a file may import from its own floor or below, never above. A circle is
searched over files (module-level and function-level imports alike), so a function-level import cannot
hide one. A ``_private`` name is the file's own business: importing it from another file fails.

Function-level imports of moeprune's own modules are the exception: one that buys start-up time (the
module pulls in torch, transformers or lm-eval, and ``moeprune --help`` must stay fast) carries a
``# lazy: <reason>`` comment on its line; the unmarked ones left from before (counted in imported names,
:data:`MAX_FUNCTION_LEVEL`) may only fall. Third-party imports inside functions (torch, lm_eval,
matplotlib, ...) are free.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "moeprune"

# Ground floor first. Rooms on one floor may import each other (the circle check still holds).
FLOORS: tuple[tuple[str, ...], ...] = (
    ("", "errors", "bundled", "models", "presets", "options"),  # "" is moeprune/__init__.py (only __version__)
    # streaming: the layer-major runner every stage shares; quant: quantized layouts as data (apply, the streamer)
    ("io", "data", "arch", "streaming", "loading", "quant"),
    ("profiling",),
    ("planning",),
    ("reconstruction", "inspect"),
    ("surgery",),  # surgery.delta: the recovery delta format, which export writes and evaluation applies
    ("recovery",),  # makes deltas, running the pruned model inside surgery.masked
    ("evaluation",),  # measurement: perplexity, lm-eval, footprints, the report's tables and plots
    ("preflight",),  # the one preflight: every check before the work, for the CLI and the api's verbs
    ("api",),  # the pipeline's verbs: profile, plan, apply, recover, prune, evaluate
    ("experiment",),  # orchestration: the grid of methods x ratios x recoveries, through the api
    ("cli", "__main__"),
)

# Known arrows that still run up (issue 20), each "from-module -> to-module". The test fails when one is
# gone (strike it from here) as well as when a new one appears.
KNOWN_UPWARD: set[str] = set()
# Known circles (issue 20), each the sorted files of one strongly connected component.
KNOWN_CIRCLES: set[tuple[str, ...]] = set()
KNOWN_PRIVATE: set[str] = set()
MAX_FUNCTION_LEVEL = 0  # 137 before issue 20, 88 after its first half: every one is now marked "# lazy:"


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> list[tuple[str, str, str | None, bool, str]]:
    """(importer, imported module, imported name or None, at function level, source line) for every import."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module(path)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        nested = {
            id(inner)
            for outer in ast.walk(tree)
            if isinstance(outer, ast.FunctionDef | ast.AsyncFunctionDef)
            for inner in ast.walk(outer)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.Import):
                target, names = "", [alias.name for alias in node.names]
            else:
                continue
            line = lines[node.lineno - 1]
            for name in names:
                mod, attr = (target, name) if target else (name, None)
                if mod == "moeprune" or mod.startswith("moeprune."):
                    found.append((module, mod, attr, id(node) in nested, line))
    return found


def _resolve(modules: set[str], mod: str, attr: str | None) -> str:
    """The file an import reads: ``from moeprune import api`` reads ``moeprune.api``."""
    if attr and f"{mod}.{attr}" in modules:
        return f"{mod}.{attr}"
    return mod


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _floor(module: str) -> int:
    room = _room(module)
    for level, rooms in enumerate(FLOORS):
        if room in rooms:
            return level
    raise AssertionError(f"{module}: room {room!r} has no floor; add it to FLOORS in tests/test_layering.py")


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = {_module(p) for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = defaultdict(set)
    for importer, mod, attr, _, _ in _imports():
        target = _resolve(modules, mod, attr)
        if target != importer:
            edges[importer].add(target)
    return edges


def test_every_room_has_a_floor() -> None:
    for path in PACKAGE.rglob("*.py"):
        _floor(_module(path))


def test_imports_only_run_down(graph: dict[str, set[str]]) -> None:
    upward = {f"{a} -> {b}" for a, targets in graph.items() for b in targets if _floor(b) > _floor(a)}
    assert upward - KNOWN_UPWARD == set(), "imports that run back up the floors (see FLOORS)"
    assert KNOWN_UPWARD - upward == set(), "gone: strike these from KNOWN_UPWARD"


def _components(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """Strongly connected components with more than one file (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[tuple[str, ...]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(tuple(sorted(component)))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_circles(graph: dict[str, set[str]]) -> None:
    circles = set(_components(graph))
    assert circles - KNOWN_CIRCLES == set(), "files that import each other in a loop"
    assert KNOWN_CIRCLES - circles == set(), "gone: strike these from KNOWN_CIRCLES"


def test_no_private_names_across_files() -> None:
    modules = {_module(p) for p in PACKAGE.rglob("*.py")}
    private = {
        f"{importer} -> {mod}.{attr}"
        for importer, mod, attr, _, _ in _imports()
        if attr
        and attr.startswith("_")
        and not attr.startswith("__")
        and _resolve(modules, mod, attr) == mod
        and mod != importer
    }
    assert private - KNOWN_PRIVATE == set(), "private names imported from another file: make them public"
    assert KNOWN_PRIVATE - private == set(), "gone: strike these from KNOWN_PRIVATE"


def test_function_level_imports_only_fall() -> None:
    inside = [(importer, mod) for importer, mod, _, nested, line in _imports() if nested and "# lazy:" not in line]
    assert len(inside) <= MAX_FUNCTION_LEVEL, (
        f"{len(inside)} function-level imports of moeprune modules (at most {MAX_FUNCTION_LEVEL}): move the new one "
        "to the top of its file, or mark it '# lazy: <reason>' when it keeps start-up fast"
    )


def test_the_checks_can_fail() -> None:
    """The circle search finds a planted loop and the floor map puts the CLI above the API."""
    assert _components({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [("a", "b", "c")]
    assert _floor("moeprune.cli") > _floor("moeprune.api") > _floor("moeprune.planning.mask")


STAGES = ("profiling", "planning", "reconstruction", "surgery", "recovery", "evaluation")


def test_stages_never_read_presets_or_the_preflight(graph: dict[str, set[str]]) -> None:
    """Settings are resolved once, at the door (api, experiment, cli): a stage takes resolved options and never
    decides a preset or runs the preflight itself."""
    reads = {f"{a} -> {b}" for a, targets in graph.items() if _room(a) in STAGES for b in targets
             if b in ("moeprune.presets", "moeprune.preflight")}
    assert reads == set(), "stages that read the presets or the preflight"
    assert {"moeprune.api -> moeprune.preflight"} <= {f"{a} -> {b}" for a, t in graph.items() for b in t}


# ---------------------------------------------------------------------------------------------- widths (issue 26)
# Parameters that travel together are bundled into the typed options (options.Calibration, ReconstructionOptions,
# EvalSettings, PlanRequest, surgery.ExportOptions, reconstruction.SearchSettings, ...), so signatures stay narrow.
# Counted as at commit 48b5973: every parameter, self/cls not, *args and **kwargs one each.
WIDE = 8  # a public function with this many parameters or more is "wide"
MAX_WIDE = 4  # 16 before issue 26's second half (api.prune, plan_many, apply, run_experiment left); may only fall
MAX_VERB = 10  # the widest public verb
VERBS = {"api": ("profile", "plan", "plan_many", "apply", "prune", "evaluate", "recover"),
         "experiment": ("run_experiment",)}


def _width(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = node.args
    n = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
    return n - 1 if a.args and a.args[0].arg in ("self", "cls") else n


def _widths(sources: dict[str, str]) -> dict[str, int]:
    """``{"module:function": parameters}`` for every public function (methods too) of ``{module: source}``."""
    return {
        f"{module}:{node.name}": _width(node)
        for module, text in sources.items()
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and not node.name.startswith("_")
    }


def _package_widths() -> dict[str, int]:
    return _widths({_module(p): p.read_text() for p in sorted(PACKAGE.rglob("*.py"))})


def _wide(widths: dict[str, int]) -> dict[str, int]:
    return {name: n for name, n in widths.items() if n >= WIDE}


def _verbs(widths: dict[str, int]) -> dict[str, int]:
    return {f"moeprune.{m}:{v}": widths[f"moeprune.{m}:{v}"] for m, names in VERBS.items() for v in names}


def test_public_functions_stay_narrow() -> None:
    wide = _wide(_package_widths())
    assert len(wide) <= MAX_WIDE, (
        f"{len(wide)} public functions take {WIDE} or more parameters (at most {MAX_WIDE}): bundle the ones that "
        f"travel together into the typed options instead: {sorted(wide.items(), key=lambda kv: -kv[1])}"
    )


def test_verbs_take_at_most_ten_parameters() -> None:
    too_wide = {name: n for name, n in _verbs(_package_widths()).items() if n > MAX_VERB}
    assert too_wide == {}, f"verbs with more than {MAX_VERB} parameters (bundle settings into options)"


def test_the_width_counts_can_fail() -> None:
    """A planted wide function is counted (self not, *args and **kwargs one each) and a wide verb is found."""
    planted = _widths({"moeprune.api": "class A:\n    def f(self, a, b, *c, d, e, f, g, **h): ...\n"
                                       "def prune(a, b, c, d, e, f, g, h, i, j, k): ...\n"
                                       "def _private(a, b, c, d, e, f, g, h): ...\n"})
    assert planted == {"moeprune.api:f": 8, "moeprune.api:prune": 11}
    assert _wide(planted) == planted
    assert {name: n for name, n in _verbs({**_package_widths(), **planted}).items() if n > MAX_VERB} == {
        "moeprune.api:prune": 11}
    assert set(_verbs(_package_widths())) == {f"moeprune.{m}:{v}" for m, names in VERBS.items() for v in names}
