"""Import layering: the project's modules (the .py files at the root and in data/) import one another without a
cycle, and never inside a function (a top-level `if`/`try` is fine), so each file reads after those it imports."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def layering(sources: dict[str, str]) -> tuple[list[list[str]], list[str]]:
    """{module name: source} -> (import cycles among these modules, each as a path [a, b, ..., a];
    "m imports n inside a function" for each function-local import of a module of the set)."""
    edges, local = {m: set() for m in sources}, []

    def visit(mod, node, in_function):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:  # from M import n: M itself, or its submodule M.n; relative imports resolved within the package
                base = mod.rsplit(".", node.level)[0] if node.level else ""
                m = ".".join(p for p in (base, node.module or "") if p)
                names = [m] + [f"{m}.{a.name}" for a in node.names]
            for n in sorted({n for n in names if n in sources and n != mod}):
                edges[mod].add(n)
                if in_function:
                    local.append(f"{mod} imports {n} inside a function")
        inside = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(mod, child, inside)

    for mod, text in sources.items():
        visit(mod, ast.parse(text), False)
    cycles, done = [], set()

    def walk(m, path):  # depth-first; a module met again on the current path closes a cycle
        if m in path:
            cycles.append(path[path.index(m):] + [m])
        elif m not in done:
            for n in sorted(edges[m]):
                walk(n, path + [m])
            done.add(m)

    for m in sorted(sources):
        walk(m, [])
    return cycles, local


def project_sources() -> dict[str, str]:
    files = [*ROOT.glob("*.py"), *(ROOT / "data").glob("*.py")]
    return {".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): f.read_text()
            for f in files}


def test_no_import_cycle_and_no_function_local_import():
    sources = project_sources()
    assert {"model", "train", "data.locomo", "data.gym"} <= set(sources)
    cycles, local = layering(sources)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
    assert not local, "function-local imports of project modules: " + "; ".join(local)


def test_the_checker_finds_a_cycle_and_a_local_import():
    sources = {"a": "import b\n", "b": "from c import x\n",
               "c": "import os\ntry:\n    import a\nexcept ImportError:\n    pass\n",  # a top-level try is fine
               "d": "if True:\n    import a\ndef f():\n    import c\n",
               "pkg.e": "from . import f\n", "pkg.f": "import a\n"}
    cycles, local = layering(sources)
    assert cycles == [["a", "b", "c", "a"]]
    assert local == ["d imports c inside a function"]
    assert layering({"x": "", "y": "class K:\n    def m(self):\n        from x import z\n"}) == (
        [], ["y imports x inside a function"])
    real = project_sources()  # the real graph's edges are found: model.py importing train.py closes a cycle
    real["model"] += "\nimport train\n\n\ndef late():\n    import sampling\n"
    cycles, local = layering(real)
    assert any("model" in c and "train" in c for c in cycles)
    assert "model imports sampling inside a function" in local
