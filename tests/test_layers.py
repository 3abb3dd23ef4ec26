"""The module map of STYLE.md, enforced: bridge modules import only their own layer or lower ones,
and the simulator shares no code with what it checks."""
import ast
from pathlib import Path

import pytest

BRIDGE = Path(__file__).resolve().parent.parent / "bridge"
LAYERS = {
    0: {"errors", "log", "config", "db", "writelock", "migrations", "watchdog", "memory", "ids"},
    1: {"budget", "upstream", "cws", "g2a", "pricing", "contract", "products", "crypto", "auth", "pause", "alerts", "lease",
        "stock", "pacing", "sharedwindow"},
    2: {"reservations", "quickhold", "keys", "claims", "orders", "fulfillment", "catalogue", "offers", "plan", "sync", "sweep", "lane",
        "delta", "postbacks", "refresh", "doctor", "freshness", "status", "metrics", "report", "stuck", "balance"},
    3: {"web", "access", "httpserver", "worker", "cli", "demo", "__main__", "__init__"},
}
SIMULATOR = "sim"  # the package bridge/sim/: a side module, imported only by entry points
LAYER_OF = {name: layer for layer, names in LAYERS.items() for name in names}


def bridge_imports(path):
    """Names of the bridge modules a file imports (relative or absolute)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 2:
            names.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
        elif isinstance(node, ast.ImportFrom) and node.level == 1 and path.parent.name == SIMULATOR:
            names.add(SIMULATOR)
        elif isinstance(node, ast.ImportFrom) and node.level == 1:
            names.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bridge."):
            names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names if a.name.startswith("bridge."))
    return names


MODULES = sorted(p.stem for p in BRIDGE.glob("*.py"))
SIMULATOR_FILES = sorted(p.name for p in (BRIDGE / SIMULATOR).glob("*.py"))
ENTRY_POINTS_USING_THE_SIMULATOR = {"cli", "demo"}


def test_bridge_lists_only_what_runs_in_production():
    assert not [m for m in MODULES if m.startswith("sim")], "simulator modules belong in bridge/sim/"


@pytest.mark.parametrize("module", MODULES)
def test_every_module_has_a_place_in_the_map(module):
    assert module in LAYER_OF, f"add bridge/{module}.py to LAYERS in {__file__}"


@pytest.mark.parametrize("module", MODULES)
def test_imports_point_down_the_layers(module):
    for name in bridge_imports(BRIDGE / f"{module}.py"):
        if name == SIMULATOR:
            assert module in ENTRY_POINTS_USING_THE_SIMULATOR, f"{module} imports the simulator; only the " \
                                                               "CLI's simulate and demo may"
            continue
        assert LAYER_OF[name] <= LAYER_OF[module], f"{module} (layer {LAYER_OF[module]}) imports {name} " \
                                                   f"(layer {LAYER_OF[name]})"


@pytest.mark.parametrize("filename", SIMULATOR_FILES)
def test_the_simulator_imports_nothing_of_the_bridge_it_checks(filename):
    assert bridge_imports(BRIDGE / SIMULATOR / filename) <= {SIMULATOR}


def test_every_module_opens_with_a_docstring():
    files = [BRIDGE / f"{m}.py" for m in MODULES] + [BRIDGE / SIMULATOR / f for f in SIMULATOR_FILES]
    missing = [f.name for f in files if not ast.get_docstring(ast.parse(f.read_text()))]
    assert missing == []
