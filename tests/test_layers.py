"""The layers import one way: core <- engines <- {training, serving} <- benchmarks, cyborg (the CLI).

Read from the source (every import statement, lazy ones inside functions included), with the same
reader as scripts/code_stats.py; docs/architecture.md draws the picture these rules keep true.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("code_stats", ROOT / "scripts" / "code_stats.py")
code_stats = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(code_stats)

PROJECT = ("core", "engines", "training", "serving", "benchmarks", "annotate", "cyborg")
TORCH = {"torch", "torchvision", "timm", "onnx", "onnxscript", "sklearn"}  # the training install only
# package -> (project packages it may import, third-party packages it may import or None for any)
RULES = {
    "core": ({"core"}, {"numpy", "PIL"}),
    "engines": ({"core", "engines"}, {"numpy", "PIL", "onnxruntime", "tensorrt", "cuda"}),
    "serving": ({"core", "engines", "serving"}, None),
    "training": ({"core", "engines", "training"}, None),
    "benchmarks": ({"core", "engines", "training", "serving", "benchmarks"}, None),
    "annotate": ({"core", "training", "serving", "annotate"}, None),  # the browser app: writes training data, checks photos via the client
    "cyborg": ({"core", "cyborg"}, {"numpy"}),  # command modules are imported by name, only when run
}


def imports_of(package: str) -> dict[str, set[str]]:
    """Module (relative path) -> top-level names it imports."""
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
            continue
        names = {name.split(".")[0] for statement in code_stats.import_statements(path) for name in statement if name}
        found[str(path.relative_to(ROOT))] = names - {"__future__"}
    return found


@pytest.mark.parametrize("package", sorted(RULES))
def test_package_imports_only_what_its_layer_allows(package):
    project_allowed, third_party_allowed = RULES[package]
    offenders = []
    for module, names in imports_of(package).items():
        for name in sorted(names):
            if name in PROJECT:
                if name not in project_allowed:
                    offenders.append(f"{module} imports {name}")
            elif name not in sys.stdlib_module_names and third_party_allowed is not None and name not in third_party_allowed:
                offenders.append(f"{module} imports {name}")
    assert offenders == []


@pytest.mark.parametrize("package", ["core", "engines", "serving"])
def test_never_torch(package):
    """The serving install has no torch: nothing it runs may import it, even lazily."""
    offenders = [f"{module} imports {name}" for module, names in imports_of(package).items() for name in sorted(names & TORCH)]
    assert offenders == []


def test_no_import_cycles():
    files = code_stats.source_files()
    modules = {code_stats.module_name(path) for path in files}
    graph = {}
    for path in files:
        names = {name for statement in code_stats.import_statements(path) for name in statement}
        graph[code_stats.module_name(path)] = {name for name in names if name in modules and name != code_stats.module_name(path)}
    assert code_stats.import_cycles(graph) == []
