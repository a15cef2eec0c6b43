"""Keep only the mutants inside the named functions of a cosmic-ray session (the others are marked
skipped), so that a large module can be mutation-tested one part at a time.

    python tools/mutate_select.py SESSION.sqlite MODULE.py NAME[,NAME...]

NAME is a function, a class (all its methods), Class.method, outer.inner (a nested function)
or FIRST-LAST (a range of source lines, for a stretch of a long function).
"""

from __future__ import annotations

import ast
import sys

from cosmic_ray.work_db import WorkDB, use_db
from cosmic_ray.work_item import WorkerOutcome, WorkResult


def line_ranges(source: str, names: set[str]) -> list[tuple[int, int]]:
    """(first, last) line of each definition named in `names` (decorators included)."""
    found, ranges = set(), []
    for name in names:  # FIRST-LAST: a line range, for a stretch of a long function
        first, sep, last = name.partition("-")
        if sep and first.isdigit() and last.isdigit():
            found.add(name)
            ranges.append((int(first), int(last)))

    def visit(body, prefix):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                qual = prefix + node.name
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if qual in names:
                    found.add(qual)
                    ranges.append((first, node.end_lineno))
                # Methods (Class.method) and nested functions (outer.inner) are named by their path.
                visit(node.body, qual + ".")
    visit(ast.parse(source).body, "")
    missing = names - found
    if missing:
        raise SystemExit(f"mutate_select: no definition named {sorted(missing)}")
    return ranges


def main(session: str, module: str, names: str) -> None:
    with open(module) as f:
        ranges = line_ranges(f.read(), {n for n in names.split(",") if n})
    kept = skipped = 0
    with use_db(session, WorkDB.Mode.open) as db:
        for item in list(db.pending_work_items):
            inside = all(any(lo <= m.start_pos[0] <= hi for lo, hi in ranges) for m in item.mutations)
            if inside:
                kept += 1
            else:
                skipped += 1
                db.set_result(item.job_id, WorkResult(output=f"outside {names}",
                                                      worker_outcome=WorkerOutcome.SKIPPED))
    print(f"mutate_select: {kept} mutants in {names}, {skipped} others skipped")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
