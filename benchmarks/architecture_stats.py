"""The shape of a mnemo tree: its largest modules (lines) and the imports between its parts.

    python benchmarks/architecture_stats.py [--repo DIR] [--top 15]

DIR is a checkout (default: this one), so two states can be compared side by
side: ``git worktree add /tmp/old REV`` and run it on both. A part is a
top-level folder (mnemo/ is the CLI layer); imports are counted whether
written ``mnemo.train.x``, the installed name, or ``train.x``, the bare name
older trees used. Tests and benchmarks are not parts and are not counted.
"""

from __future__ import annotations

import argparse
import ast
from collections import Counter
from pathlib import Path

PARTS = ("mnemo", "launch", "train", "evaluation", "data_pipeline", "model")


def part_of(module: str) -> str | None:
    """``mnemo.train.trainer`` or ``train.trainer`` -> ``train``; ``mnemo.cli`` -> ``mnemo``; others None."""
    head, _, rest = module.partition(".")
    if head == "mnemo":
        sub = rest.partition(".")[0]
        return sub if sub in PARTS and sub != "mnemo" else "mnemo"
    return head if head in PARTS and head != "mnemo" else None


def modules(repo: Path) -> dict[str, Path]:
    """'train/trainer.py' -> its path, for every Python file of every part present in ``repo``."""
    return {
        p.relative_to(repo).as_posix(): p
        for part in PARTS
        if (repo / part).is_dir()
        for p in sorted((repo / part).rglob("*.py"))
    }


def edges(repo: Path) -> Counter:
    """(from part, to part) -> number of import statements, own part excluded."""
    out: Counter = Counter()
    for rel, path in modules(repo).items():
        src = rel.split("/")[0]
        for node in ast.walk(ast.parse(path.read_text(), rel)):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                targets = [node.module]
            else:
                continue
            for t in targets:
                dst = part_of(t)
                if dst and dst != src:
                    out[(src, dst)] += 1
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]))
    p.add_argument("--top", type=int, default=15)
    a = p.parse_args(argv)
    repo = Path(a.repo)
    sizes = sorted(((len(f.read_text().splitlines()), rel) for rel, f in modules(repo).items()), reverse=True)
    print(f"{repo}: {len(sizes)} modules, {sum(n for n, _ in sizes)} lines")
    print(f"largest modules (lines), modules over 500: {sum(n > 500 for n, _ in sizes)}")
    for n, rel in sizes[: a.top]:
        print(f"  {n:5d}  {rel}")
    print("imports between parts (statements)")
    for (s, d), n in sorted(edges(repo).items()):
        print(f"  {s:>13} -> {d:<13} {n:4d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
