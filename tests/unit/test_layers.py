"""The package layers, checked on the source with ``ast``.

    cli (mnemo/)      parses arguments, one public function per command; the demo; may use every part
    launch/           starting jobs; may use train, evaluation, data_pipeline, model
    train/            the training loop; may use evaluation (the in-run eval), data_pipeline, model
    evaluation/       scoring, reports, held-out documents, generation; may use data_pipeline, model
    data_pipeline/    corpus to shards, streams; nothing else of mnemo's
    model/            the network, importing nothing of mnemo's

Every import counts, at module level or inside a function (a function-level
import is still a dependency, only a later one). Three kinds of problem:
an edge between parts that the table below forbids, a circle between modules,
and a private name (leading underscore) imported from another module.
"""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# folder in the checkout -> (its package name, its part)
FOLDERS = {
    "mnemo": ("mnemo", "cli"),
    "launch": ("mnemo.launch", "launch"),
    "train": ("mnemo.train", "train"),
    "evaluation": ("mnemo.evaluation", "evaluation"),
    "data_pipeline": ("mnemo.data_pipeline", "data_pipeline"),
    "model": ("mnemo.model", "model"),
}

# part -> the parts it may import (its own included)
ALLOWED = {
    "cli": {"cli", "launch", "train", "evaluation", "data_pipeline", "model"},
    "launch": {"launch", "train", "evaluation", "data_pipeline", "model"},
    "train": {"train", "evaluation", "data_pipeline", "model"},
    "evaluation": {"evaluation", "data_pipeline", "model"},
    "data_pipeline": {"data_pipeline"},
    "model": {"model"},
}


def module_of(rel: str) -> tuple[str, str, bool]:
    """``train/trainer.py`` -> (``mnemo.train.trainer``, ``train``, is_package)."""
    folder, *rest = Path(rel).with_suffix("").parts
    package, part = FOLDERS[folder]
    if rest == ["__init__"]:
        return package, part, True
    return ".".join([package, *rest]), part, False


def part_of(module: str) -> str | None:
    """The part a mnemo module belongs to (None: not mnemo's)."""
    best = None
    for package, part in FOLDERS.values():
        if module == package or module.startswith(package + "."):
            if best is None or len(package) > len(best[0]):
                best = (package, part)
    return best[1] if best else None


def _imports(tree: ast.AST, module: str, is_package: bool, known: set[str]):
    """(target module, imported names, line) for every import of a mnemo module in ``tree``.

    ``from mnemo.train import checkpoint`` targets the submodule
    ``mnemo.train.checkpoint``; ``from mnemo.model import ModelArgs`` targets
    the package ``mnemo.model`` (its ``__init__``).
    """
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if part_of(alias.name):
                    yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            if not part_of(base):
                continue
            names = []
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in known:
                    yield sub, [], node.lineno
                else:
                    names.append(alias.name)
            if names:
                yield base, names, node.lineno


def _find_cycle(graph: dict[str, set[str]], scc: set[str]) -> list[str]:
    """One circle through the modules of a strongly connected component, as a path a -> ... -> a."""
    start = min(scc)
    parent = {start: None}
    stack = [start]
    while stack:  # BFS within the component until an edge closes back to start
        nxt = []
        for u in stack:
            for v in sorted(graph[u] & scc):
                if v == start:
                    path = [u]
                    while parent[path[-1]] is not None:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if v not in parent:
                    parent[v] = u
                    nxt.append(v)
        stack = nxt
    return [start]


def _sccs(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components (iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on, stack, out = set(), [], []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            u, it = work[-1]
            for v in it:
                if v not in index:
                    index[v] = low[v] = len(index)
                    stack.append(v)
                    on.add(v)
                    work.append((v, iter(sorted(graph[v]))))
                    break
                if v in on:
                    low[u] = min(low[u], index[v])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[u])
                if low[u] == index[u]:
                    comp = set()
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.add(w)
                        if w == u:
                            break
                    out.append(comp)
    return out


def check(sources: dict[str, str]) -> tuple[list[str], Counter]:
    """Problems found in ``sources`` (path relative to the checkout -> text), and the part-to-part edge counts."""
    mods = {rel: module_of(rel) for rel in sources}
    known = {m for m, _, _ in mods.values()}
    graph: dict[str, set[str]] = {m: set() for m in known}
    edges: Counter = Counter()
    problems: list[str] = []
    for rel, text in sorted(sources.items()):
        module, part, is_package = mods[rel]
        for target, names, line in _imports(ast.parse(text, rel), module, is_package, known):
            dst = part_of(target)
            edges[(part, dst)] += 1
            if dst not in ALLOWED[part]:
                problems.append(f"forbidden edge {part} -> {dst}: {rel}:{line} imports {target}")
            if target != module:
                if target in graph:
                    graph[module].add(target)
                for name in names:
                    if name.startswith("_"):
                        problems.append(f"private name: {rel}:{line} imports {name} from {target}")
    for comp in _sccs(graph):
        if len(comp) > 1:
            problems.append("import circle: " + " -> ".join(_find_cycle(graph, comp)))
    return problems, edges


def repo_sources() -> dict[str, str]:
    out = {}
    for folder in FOLDERS:
        for path in sorted((REPO / folder).rglob("*.py")):
            out[path.relative_to(REPO).as_posix()] = path.read_text()
    return out


def edge_table(edges: Counter) -> str:
    return "\n".join(f"  {a:>13} -> {b:<13} {n:4d}" for (a, b), n in sorted(edges.items()))


def test_the_layers_hold():
    sources = repo_sources()
    assert len(sources) > 30 and "train/trainer.py" in sources and "mnemo/__main__.py" in sources
    problems, edges = check(sources)
    table = edge_table(edges)
    print("\npart-to-part imports checked:\n" + table)
    assert not problems, "\n".join(problems) + "\n\npart-to-part imports:\n" + table


def test_the_checker_reports_a_forbidden_edge_a_circle_and_a_private_name():
    sources = {
        "model/net.py": "def f():\n    from mnemo.train.loop import step\n",  # model -> train, inside a function
        "train/loop.py": "from mnemo.model import net\nstep = 1\n",  # ... and back: a circle
        "train/other.py": "from mnemo.train.loop import _hidden\n",
        "launch/ok.py": "from mnemo.train import loop\nimport mnemo.data_pipeline.x\n",
        "data_pipeline/x.py": "",
    }
    problems, edges = check(sources)
    assert "forbidden edge model -> train: model/net.py:2 imports mnemo.train.loop" in problems
    assert "import circle: mnemo.model.net -> mnemo.train.loop -> mnemo.model.net" in problems
    assert "private name: train/other.py:1 imports _hidden from mnemo.train.loop" in problems
    assert len(problems) == 3, problems
    assert edges == Counter(
        {
            ("model", "train"): 1,
            ("train", "model"): 1,
            ("train", "train"): 1,
            ("launch", "train"): 1,
            ("launch", "data_pipeline"): 1,
        }
    )


def test_a_longer_circle_is_reported_in_order():
    sources = {
        "train/a.py": "import mnemo.train.b\n",
        "train/b.py": "def g():\n    from mnemo.train import c\n",
        "train/c.py": "from mnemo.train.a import x\n",
    }
    problems, _ = check(sources)
    assert problems == ["import circle: mnemo.train.a -> mnemo.train.b -> mnemo.train.c -> mnemo.train.a"]
