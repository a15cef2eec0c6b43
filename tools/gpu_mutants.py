#!/usr/bin/env python
"""The mutation pass of the mutants only a CUDA GPU tells apart (docs/TESTING.md: the survivors recorded as
"GPU-only" or "Not distinguishable on the CPU"), each with the tests of tests/test_gpu_survivors.py meant to
kill it.

    python tools/gpu_mutants.py --out DIR [--only TEXT] [--timeout S] [--budget S]   (on a CUDA machine)
    python tools/gpu_mutants.py --dry-run      (anywhere: each mutant's original text is in its file exactly once)
    python tools/gpu_mutants.py --list

A mutant is one exact text replacement in one file (the list below, from TESTING.md's records). The pass first
runs all the listed tests on the unmodified tree and stops if any fails or is skipped; then, one mutant at a
time, it writes the mutant into the working tree, runs that mutant's tests with pytest (killed: they fail;
survived: they pass) and writes the file back from a saved copy, also on an error, a timeout or SIGTERM (a
run killed harder leaves `FILE.gpu_mutants.orig` beside the file, which the next run puts back first).
Results go to DIR/gpu_mutants.json (rewritten after each mutant) and DIR/gpu_mutants.txt.
Exit status: 0 all killed, 1 some survived or errored, 2 refused (no CUDA, a bad list, the baseline failed).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BACKUP_SUFFIX = ".gpu_mutants.orig"
T = "tests/test_gpu_survivors.py::"
ROUTER_TIES = (T + "test_capacity_ties_keep_the_earlier_assignment_on_cuda",
               T + "test_router_capacity_drops_the_later_of_equal_tokens_on_cuda")
TABLE_UPLOAD = (T + "test_slot_table_upload_is_pinned_and_asynchronous",)
KERNEL_CHOICE = (T + "test_device_bookkeeping_takes_a_fused_kernel_on_cuda",)
FIRST_OCCURRENCE = (T + "test_device_bookkeeping_of_repeated_experts_takes_their_first_occurrence_on_cuda",)
LOAD = (T + "test_copies_wait_for_the_evicted_experts_last_reader_and_keep_the_logits",)
WAIT = (T + "test_wait_returns_once_each_slots_copy_has_landed_and_times_it",)
WAIT_ALL = (T + "test_wait_all_waits_for_every_layers_copies",)
DEVICE_WAIT = (T + "test_device_wait_queues_the_compute_after_the_copies_without_blocking",)
ROWS_LOOP = (T + "test_host_built_row_indices_reach_the_gpu_without_a_host_sync[eager-loop]",)
ROWS_DEQUANT = (T + "test_host_built_row_indices_reach_the_gpu_without_a_host_sync[int8-dequant]",)
ATTN_GPU = (T + "test_attention_time_of_cuda_experts_is_the_gpu_time_in_seconds",)
ATTN_HOST = (T + "test_attention_time_of_host_experts_on_a_gpu_machine_is_host_time",)
TO_DEVICE = (T + "test_small_index_tensors_reach_the_gpu_without_a_host_sync",)


@dataclasses.dataclass(frozen=True)
class Mutant:
    id: str
    path: str          # relative to the repository root
    original: str      # exact text, found exactly once in the file
    replacement: str
    tests: tuple[str, ...]


def _variants(prefix, path, original, tests, replacements):
    return [Mutant(f"{prefix}-{name}", path, original, new, tests) for name, new in replacements]


ROUTER, CACHE, DEVICE_CACHE = "moesys/layers/router.py", "moesys/offload/cache.py", "moesys/offload/device_cache.py"
ENGINE, FSSDP = "moesys/offload/engine.py", "moesys/parallel/fssdp.py"
_BY_SCORE = "by_score_N = torch.sort(score_N, descending=True, stable=True).indices"
_BY_EXPERT = "order_N = by_score_N[torch.sort(ids_N[by_score_N], stable=True).indices]"
_UPLOAD_IF = 'if self.device.type == "cuda":\n                idx_val = idx_val.pin_memory()'
_UPLOAD = "idx_val = idx_val.pin_memory().to(self.device, non_blocking=True)"
_CHOICE = "use_kernel = self.table.is_cuda and triton is not None"
_BATCH = "if distinct and protect_N is None:"
_FIRST = "order_N = torch.sort(key_N, stable=True).indices"
_USED = "used = self.layer_used.get(evicted[0]) if self.cuda else None"
_USED_IF = "if used is not None:\n                waits[id(used)] = used"
_WAITS = "for used in waits.values():\n                    self.copy_stream.wait_event(used)"
_ROWS = "[self.store.row_index(layer, e) for e in experts]"
_PENDING = "self.pending[layer].update(slots)"
_READY = "for slot in slots:\n                    self.cache.ready[slot] = event"
_WAIT_LOOP = "for slot in slots:\n            event = self.cache.ready[slot]"
_WAIT_SKIP = "if event is None:\n                continue"
_WAIT_QUERY = "if not event.query():"
_WAIT_TIME = "self.stats.copy_wait_s += time.perf_counter() - t0"
_WAIT_ALL = "for layer, slots in self.pending.items():"
_DEVICE_WAIT = "torch.cuda.current_stream(self.device).wait_event(event)"
_LOOP_ROWS = "kt_N2 = kt_N2.pin_memory().to(self.device, non_blocking=True)"
_DEQUANT_ROWS = ("idx = idx.pin_memory().to(self.device, non_blocking=True)\n"
                 "        N = pos.size")
_ASYNC = "return t.pin_memory().to(device, non_blocking=True)"
_ASYNC_IF = 'if device.type != "cuda":\n        return t.to(device)'
_MARK = "if torch.cuda.is_available() and self.gate_up_proj.is_cuda:"
_TIMING = "event = torch.cuda.Event(enable_timing=True)"
_SECONDS = "return start.elapsed_time(end) / 1e3"

MUTANTS: list[Mutant] = [
    # router.py, keep_top_per_expert (called by Router._capacity_mask): the tie rule's two stable sorts
    Mutant("router-sort-by-score-unstable", ROUTER, _BY_SCORE, _BY_SCORE.replace("True).", "False)."), ROUTER_TIES),
    Mutant("router-sort-by-expert-unstable", ROUTER, _BY_EXPERT, _BY_EXPERT.replace("True", "False"), ROUTER_TIES),
    # cache.py, ExpertCache.update_table: the pinned asynchronous upload of the slot table
    Mutant("cache-table-upload-gt", CACHE, _UPLOAD_IF, _UPLOAD_IF.replace("==", ">"), TABLE_UPLOAD),
    Mutant("cache-table-upload-blocking", CACHE, _UPLOAD, _UPLOAD.replace("True", "False"), TABLE_UPLOAD),
    # device_cache.py, DeviceCacheTables.step's kernel choice and _step_reference's first occurrences
    *_variants("device-cache-kernel", DEVICE_CACHE, _CHOICE, KERNEL_CHOICE, [
        ("triton-is-none", _CHOICE.replace("is not None", "is None")),
        ("first-and-to-or", _CHOICE.replace("is_cuda and", "is_cuda or"))]),
    Mutant("device-cache-batch-takes-the-token-kernel", DEVICE_CACHE, _BATCH, "if True:", KERNEL_CHOICE),
    Mutant("device-cache-first-occurrence-unstable", DEVICE_CACHE, _FIRST, _FIRST.replace("True", "False"),
           FIRST_OCCURRENCE),
    # engine.py, OffloadEngine._allocate's and _copy_run's CUDA branch (13)
    *_variants("engine-load-last-reader", ENGINE, _USED, LOAD, [
        ("evicted-1", _USED.replace("evicted[0]", "evicted[1]")),
        ("evicted-minus-1", _USED.replace("evicted[0]", "evicted[-1]")),
        ("not-cuda", _USED.replace("if self.cuda", "if not self.cuda"))]),
    *_variants("engine-load-wait-if", ENGINE, _USED_IF, LOAD, [
        ("not-is-not-none", _USED_IF.replace("if used is not None", "if not used is not None")),
        ("is-none", _USED_IF.replace("if used is not None", "if used is None"))]),
    Mutant("engine-load-waits-none", ENGINE, _WAITS, _WAITS.replace("in waits.values()", "in []"), LOAD),
    *_variants("engine-load-copy-rows", ENGINE, _ROWS, LOAD, [
        ("layer-0", _ROWS.replace("row_index(layer, e)", "row_index(0, e)")),
        ("expert-0", _ROWS.replace("row_index(layer, e)", "row_index(layer, 0)")),
        ("reversed", _ROWS.replace("in experts]", "in experts[::-1]]"))]),
    *_variants("engine-load-pending", ENGINE, _PENDING, LOAD, [
        ("first-dropped", _PENDING.replace("(slots)", "(slots[1:])")), ("none", _PENDING.replace("(slots)", "([])"))]),
    Mutant("engine-load-ready-first-dropped", ENGINE, _READY, _READY.replace("in slots:", "in slots[1:]:"), LOAD),
    # engine.py, OffloadEngine._wait (8) and _wait_all (1)
    Mutant("engine-wait-no-slots", ENGINE, _WAIT_LOOP, _WAIT_LOOP.replace("in slots", "in []"), WAIT),
    Mutant("engine-wait-continue-to-break", ENGINE, _WAIT_SKIP, _WAIT_SKIP.replace("continue", "break"), WAIT),
    *_variants("engine-wait-query", ENGINE, _WAIT_QUERY, WAIT, [
        ("not-not", "if not not event.query():"), ("not-removed", "if event.query():")]),
    *_variants("engine-wait-time", ENGINE, _WAIT_TIME, WAIT, [
        (name, _WAIT_TIME.replace("- t0", f"{op} t0")) for name, op in (("div", "/"), ("add", "+"), ("mul", "*"))]),
    Mutant("engine-wait-all-none", ENGINE, _WAIT_ALL, _WAIT_ALL.replace("self.pending.items()", "[]"), WAIT_ALL),
    Mutant("engine-device-wait-none", ENGINE, _DEVICE_WAIT, "None", DEVICE_WAIT),
    # engine.py, non_blocking=True of the host loop's and the dequantizing waves' row indices (2)
    Mutant("engine-loop-rows-blocking", ENGINE, _LOOP_ROWS, _LOOP_ROWS.replace("True", "False"), ROWS_LOOP),
    Mutant("engine-dequant-rows-blocking", ENGINE, _DEQUANT_ROWS, _DEQUANT_ROWS.replace("True", "False"), ROWS_DEQUANT),
    # fssdp.py, to_device_async (2), FSSDPExperts._mark (3), attention_seconds (5)
    Mutant("fssdp-to-device-blocking", FSSDP, _ASYNC, _ASYNC.replace("True", "False"), TO_DEVICE),
    Mutant("fssdp-to-device-le", FSSDP, _ASYNC_IF, _ASYNC_IF.replace("!=", "<="), TO_DEVICE),
    Mutant("fssdp-mark-not", FSSDP, _MARK, _MARK.replace("if torch", "if not torch"), ATTN_GPU),
    Mutant("fssdp-mark-or", FSSDP, _MARK, _MARK.replace(" and ", " or "), ATTN_HOST),
    Mutant("fssdp-mark-no-timing", FSSDP, _TIMING, _TIMING.replace("True", "False"), ATTN_GPU),
    *_variants("fssdp-seconds", FSSDP, _SECONDS, ATTN_GPU, [
        ("add", _SECONDS.replace("/ 1e3", "+ 1e3")), ("sub", _SECONDS.replace("/ 1e3", "- 1e3")),
        ("mul", _SECONDS.replace("/ 1e3", "* 1e3")), ("div-999", _SECONDS.replace("1e3", "999.0")),
        ("div-1001", _SECONDS.replace("1e3", "1001.0"))]),
]


def first_changed_line(text: str, m: Mutant) -> int:
    """The line of `m`'s first changed character in `text` (which holds m.original once)."""
    at = text.index(m.original)
    k = len(os.path.commonprefix([m.original, m.replacement]))
    return text.count("\n", 0, at + k) + 1


def check(root: Path, mutants: list[Mutant]) -> list[str]:
    """Problems with the list: a missing file, an original not found exactly once, a mutant that changes
    nothing or does not compile, a duplicate id, a test whose function is not in its file."""
    problems, seen = [], set()
    for m in mutants:
        if m.id in seen:
            problems.append(f"{m.id}: duplicate id")
        seen.add(m.id)
        path = root / m.path
        if not path.is_file():
            problems.append(f"{m.id}: no file {m.path}")
            continue
        text = path.read_text()
        n = text.count(m.original)
        if n != 1:
            problems.append(f"{m.id}: the original text is in {m.path} {n} times, not once:\n    {m.original!r}")
            continue
        if m.replacement == m.original:
            problems.append(f"{m.id}: the replacement changes nothing")
        try:
            compile(text.replace(m.original, m.replacement), m.path, "exec")
        except SyntaxError as e:
            problems.append(f"{m.id}: the mutated {m.path} does not compile: {e}")
        if not m.tests:
            problems.append(f"{m.id}: no tests")
        for test in m.tests:
            file, _, name = test.partition("::")
            func = name.split("[")[0]
            source = (root / file).read_text() if (root / file).is_file() else ""
            if not re.search(rf"^def {re.escape(func)}\(", source, re.M):
                problems.append(f"{m.id}: no test function {func} in {file}")
    return problems


def recover(root: Path, mutants: list[Mutant], log=print) -> None:
    """Put back the files an interrupted run left mutated (their saved copies sit beside them)."""
    for path in sorted({m.path for m in mutants}):
        backup = root / (path + BACKUP_SUFFIX)
        if backup.exists():
            (root / path).write_bytes(backup.read_bytes())
            backup.unlink()
            log(f"gpu_mutants: restored {path} from {backup.name}, left by an interrupted run")


@contextlib.contextmanager
def mutated(root: Path, m: Mutant):
    """The working tree with `m` applied; the file is written back from its saved bytes on leaving, whatever
    happened inside."""
    path, backup = root / m.path, root / (m.path + BACKUP_SUFFIX)
    saved = path.read_bytes()
    text = saved.decode()
    if text.count(m.original) != 1:
        raise ValueError(f"{m.id}: the original text is not in {m.path} exactly once")
    backup.write_bytes(saved)
    try:
        path.write_text(text.replace(m.original, m.replacement))
        yield
    finally:
        path.write_bytes(saved)
        backup.unlink()


@dataclasses.dataclass
class TestRun:
    rc: int | None       # None: timed out
    seconds: float
    passed: int = 0
    failed: int = 0      # failures and errors
    skipped: int = 0
    tail: str = ""


def outcome(run: TestRun) -> str:
    """killed: the tests noticed the mutant (failed, errored at collection or import, crashed, timed out);
    survived: they all ran and passed; error: pytest could not run them (usage, nothing collected, skips)."""
    if run.rc is None:
        return "killed (timeout)"
    if run.rc == 0:
        return "survived" if run.skipped == 0 and run.passed > 0 else "error (tests skipped or not collected)"
    if run.rc == 1:
        return "killed"
    if run.rc == 2:
        return "killed (collection error or interrupted)"
    if run.rc < 0:
        return f"killed (crashed: signal {-run.rc})"
    return f"error (pytest exit status {run.rc})"


def pytest_runner(root: Path, python: str, timeout: float):
    """run_tests(tests) -> TestRun: pytest in a fresh process (a mutant is imported anew), in `root`."""
    def run_tests(tests) -> TestRun:
        with tempfile.TemporaryDirectory() as tmp:
            xml = Path(tmp) / "junit.xml"
            cmd = [python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--tb=short", "-o", "addopts=",
                   f"--junitxml={xml}", *tests]
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, start_new_session=True)
            try:
                out, _ = proc.communicate(timeout=timeout)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = None
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    out = proc.communicate()[0]
            run = TestRun(rc, round(time.perf_counter() - t0, 1), tail="\n".join(out.splitlines()[-40:]))
            if xml.exists():
                for case in ET.parse(xml).getroot().iter("testcase"):
                    kinds = {child.tag for child in case}
                    if kinds & {"failure", "error"}:
                        run.failed += 1
                    elif "skipped" in kinds:
                        run.skipped += 1
                    else:
                        run.passed += 1
            return run
    return run_tests


def mutation_pass(root: Path, mutants: list[Mutant], run_tests, out: Path, budget: float | None = None,
                  log=print) -> dict:
    """The baseline, then each mutant: applied, its tests run, reverted. Writes out/gpu_mutants.json after each
    step and out/gpu_mutants.txt at the end; returns the JSON's contents."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tests = sorted({t for m in mutants for t in m.tests})
    log(f"gpu_mutants: baseline, {len(tests)} tests on the unmodified tree")
    base = run_tests(tests)
    report = {"baseline": dataclasses.asdict(base) | {"tests": tests}, "mutants": []}
    ok = base.rc == 0 and base.failed == 0 and base.skipped == 0 and base.passed >= len(tests)
    report["baseline"]["ok"] = ok
    if not ok:
        log(f"gpu_mutants: the baseline failed (rc {base.rc}, {base.passed} passed, {base.failed} failed, "
            f"{base.skipped} skipped): no mutant was run\n{base.tail}")
        _write(out, report)
        return report
    for i, m in enumerate(mutants, 1):
        line = first_changed_line((root / m.path).read_text(), m)
        row = {"id": m.id, "file": m.path, "line": line, "original": m.original, "replacement": m.replacement,
               "tests": list(m.tests)}
        if budget is not None and time.perf_counter() - t0 > budget:
            row["outcome"] = "not run (budget spent)"
        else:
            with mutated(root, m):
                run = run_tests(list(m.tests))
            row |= {"outcome": outcome(run), "rc": run.rc, "seconds": run.seconds, "passed": run.passed,
                    "failed": run.failed, "skipped": run.skipped, "tail": run.tail}
        log(f"[{i}/{len(mutants)}] {row['outcome']:<40} {m.id} ({m.path}:{line}, {row.get('seconds', 0)} s)")
        report["mutants"].append(row)
        _write(out, report)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    _write(out, report)
    return report


def _summary(report: dict) -> str:
    rows = report["mutants"]
    counts: dict[str, int] = {}
    for r in rows:
        key = r["outcome"].split(" (")[0] if r["outcome"].startswith(("killed", "error")) else r["outcome"]
        counts[key] = counts.get(key, 0) + 1
    base = report["baseline"]
    lines = [f"baseline: {'ok' if base['ok'] else 'FAILED'} ({base['passed']} passed, {base['failed']} failed, "
             f"{base['skipped']} skipped, {base['seconds']} s)",
             f"mutants: {len(rows)} run or listed; " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))]
    for r in rows:
        lines.append(f"{r['outcome']:<40} {r['id']:<45} {r['file']}:{r['line']}")
    return "\n".join(lines) + "\n"


def _write(out: Path, report: dict) -> None:
    tmp = out / "gpu_mutants.json.tmp"
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(out / "gpu_mutants.json")
    (out / "gpu_mutants.txt").write_text(_summary(report))


def cuda_available(python: str) -> tuple[bool, str]:
    code = ("import torch; ok = torch.cuda.is_available(); "
            "print(torch.__version__, torch.cuda.get_device_name() if ok else 'no CUDA device'); "
            "raise SystemExit(0 if ok else 1)")
    r = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return r.returncode == 0, (r.stdout.strip() or r.stderr.strip()[-300:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, help="directory for gpu_mutants.json and gpu_mutants.txt")
    p.add_argument("--dry-run", action="store_true", help="only check that every mutant applies (no GPU needed)")
    p.add_argument("--list", action="store_true", help="print the mutants and their tests")
    p.add_argument("--only", action="append", default=[], help="run the mutants whose id contains TEXT (repeatable)")
    p.add_argument("--timeout", type=float, default=180, help="seconds per pytest run (default 180)")
    p.add_argument("--budget", type=float, help="stop starting mutants after this many seconds (the rest: not run)")
    p.add_argument("--python", default=sys.executable, help="the interpreter that runs pytest")
    args = p.parse_args(argv)
    mutants = [m for m in MUTANTS if not args.only or any(s in m.id for s in args.only)]
    if not mutants:
        print(f"gpu_mutants: no mutant id contains any of {args.only}", file=sys.stderr)
        return 2
    if args.list:
        for m in mutants:
            print(f"{m.id}  {m.path}\n    - {m.original!r}\n    + {m.replacement!r}\n    tests: {', '.join(m.tests)}")
        return 0
    recover(ROOT, MUTANTS)
    problems = check(ROOT, mutants)
    for problem in problems:
        print(f"gpu_mutants: {problem}", file=sys.stderr)
    if args.dry_run:
        print(f"gpu_mutants: dry run: {len(mutants) - len({q.split(':')[0] for q in problems})} of {len(mutants)} "
              f"mutants apply exactly once and compile")
        return 2 if problems else 0
    if problems:
        return 2
    if args.out is None:
        p.error("--out DIR is required for a run")
    ok, what = cuda_available(args.python)
    if not ok:
        print(f"gpu_mutants: refusing to run: {what} ({args.python}). These mutants differ from the original code "
              f"only on a CUDA GPU, so on this machine every one would survive; run it on a GPU machine, or "
              f"check here that each mutant applies with --dry-run.", file=sys.stderr)
        return 2
    print(f"gpu_mutants: torch {what}; {len(mutants)} mutants", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # finally blocks (the file restore) still run
    report = mutation_pass(ROOT, mutants, pytest_runner(ROOT, args.python, args.timeout), args.out,
                           budget=args.budget, log=lambda s: print(s, flush=True))
    print(_summary(report), end="")
    if not report["baseline"]["ok"]:
        return 2
    return 0 if all(r["outcome"].startswith("killed") for r in report["mutants"]) else 1


if __name__ == "__main__":
    sys.exit(main())
