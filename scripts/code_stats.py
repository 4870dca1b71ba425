"""Lines of code and the package-level import graph of the tree, read from the source (nothing imported).

    python scripts/code_stats.py            # LOC per package and the import edges between packages
    python scripts/code_stats.py --modules  # also every module-to-module edge inside the project

Counted: every .py file outside tests/, .venv/, build folders and generated protobuf code
(`*_pb2.py`, `*_pb2_grpc.py`). "lines" are physical lines; "code" leaves out blank lines,
comment-only lines and docstrings. An import edge is any `import x` / `from x import y` in the
module, wherever it stands (module level or inside a function: a lazy import is still a dependency).
"""

from __future__ import annotations

import argparse
import ast
import io
import tokenize
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP_PARTS = {"tests", ".venv", "build", ".git", "runs", "cyborg.egg-info"}
EXTERNAL = {"torch", "torchvision", "timm", "onnx", "onnxruntime", "tensorrt", "grpc", "sklearn"}


def source_files(root: Path = ROOT) -> list[Path]:
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if SKIP_PARTS & set(parts) or path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
            continue
        files.append(path)
    return files


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_statements(path: Path) -> list[list[str]]:
    """For each import statement of `path`, the absolute names it may import (relative imports resolved):
    `from a.b import c` gives ["a.b", "a.b.c"], since c may be a module or a name in a.b."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    statements = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            statements.append([alias.name for alias in node.names])
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            statements.append([base] + [f"{base}.{alias.name}" for alias in node.names])
    return statements


def code_lines(path: Path) -> int:
    """Lines holding code: no blank lines, comment-only lines or docstrings."""
    text = path.read_text()
    docstring_lines: set[int] = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant) and isinstance(first.value.value, str):
                docstring_lines.update(range(first.lineno, first.end_lineno + 1))
    lines = set()
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            lines.update(range(token.start[0], token.end[0] + 1))
    return len(lines - docstring_lines)


def top_package(path: Path) -> str:
    parts = path.relative_to(ROOT).parts
    return parts[0] if len(parts) > 1 else "(top level)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", action="store_true", help="print module-to-module edges too")
    args = parser.parse_args()

    files = source_files()
    project = {module_name(p).split(".")[0] for p in files if len(p.relative_to(ROOT).parts) > 1}
    lines, code = Counter(), Counter()
    edges: dict[tuple[str, str], int] = Counter()
    module_edges: dict[str, set[str]] = defaultdict(set)
    for path in files:
        package = top_package(path)
        lines[package] += len(path.read_text().splitlines())
        code[package] += code_lines(path)
        for names in import_statements(path):
            for target in {name.split(".")[0] for name in names}:
                if target in project | EXTERNAL and target != package:
                    edges[(package, target)] += 1
            module_edges[module_name(path)].update(name for name in names if name.split(".")[0] in project)

    print("| package | files | lines | code lines |\n|---|---:|---:|---:|")
    for package in sorted(lines):
        count = sum(1 for p in files if top_package(p) == package)
        print(f"| {package} | {count} | {lines[package]} | {code[package]} |")
    print(f"| **total** | {len(files)} | {sum(lines.values())} | {sum(code.values())} |\n")
    print("Package import edges (importer -> imported: import statements naming it)")
    for (source, target), count in sorted(edges.items()):
        print(f"  {source} -> {target}: {count}")
    modules = {module_name(p) for p in files}
    graph = {source: {t for t in targets if t in modules and t != source} for source, targets in module_edges.items()}
    cycles = import_cycles(graph)
    print(f"\nImport cycles between modules: {len(cycles)}")
    for cycle in cycles:
        print(f"  {' <-> '.join(cycle)}")
    if args.modules:
        print("\nModule edges inside the project")
        for source in sorted(graph):
            if graph[source]:
                print(f"  {source} -> {', '.join(sorted(graph[source]))}")


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Groups of modules that import each other, directly or through others (strongly connected components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(groups)


if __name__ == "__main__":
    main()
