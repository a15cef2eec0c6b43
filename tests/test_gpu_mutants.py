"""tools/gpu_mutants.py on the CPU: every listed mutant applies to today's code and names tests that exist, the
pass (with stand-in test runs) classifies, reports and always restores the files, against hand-made cases; and the
GPU tests' tie cases tell the unstable-sort mutants apart under a model of torch's CUDA sort."""

import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import gpu_mutants as gm  # noqa: E402


def test_every_mutant_applies_once_compiles_and_names_collected_tests():
    """The list follows the code: a change to a mutated line must update it (run `--dry-run` to see which)."""
    assert gm.check(ROOT, gm.MUTANTS) == []
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "tests/test_gpu_survivors.py"], cwd=ROOT, capture_output=True, text=True)
    collected = {line for line in out.stdout.splitlines() if "::" in line}
    named = {t for m in gm.MUTANTS for t in m.tests}  # a parametrized function without [...] runs every case
    missing = [t for t in named if t not in collected and not any(c.startswith(t + "[") for c in collected)]
    assert missing == []
    for m in gm.MUTANTS:  # the reported line is the one the mutant changes
        text = (ROOT / m.path).read_text()
        n = gm.first_changed_line(text, m)
        assert text.splitlines()[n - 1] != text.replace(m.original, m.replacement).splitlines()[n - 1], m.id


def _tree(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("a = 1\nx = 1\n")
    return [gm.Mutant("two", "pkg/mod.py", "x = 1", "x = 2", ("t::killer",)),
            gm.Mutant("same", "pkg/mod.py", "x = 1", "x = (1)", ("t::weak",)),
            gm.Mutant("boom", "pkg/mod.py", "x = 1", "x = 3", ("t::slow",))]


def test_a_pass_reports_killed_and_survived_and_restores_every_file(tmp_path):
    mutants = _tree(tmp_path)
    seen = []

    def run_tests(tests):
        text = (tmp_path / "pkg" / "mod.py").read_text()
        seen.append((tuple(tests), text))
        if tests == ["t::slow"]:
            return gm.TestRun(None, 9.0)  # timed out
        return gm.TestRun(1 if "x = 2" in text else 0, 0.1, passed=len(tests), failed="x = 2" in text)

    report = gm.mutation_pass(tmp_path, mutants, run_tests, tmp_path / "out", log=lambda s: None)
    assert report["baseline"]["ok"] and seen[0] == (("t::killer", "t::slow", "t::weak"), "a = 1\nx = 1\n")
    assert [(r["id"], r["outcome"], r["line"]) for r in report["mutants"]] == [
        ("two", "killed", 2), ("same", "survived", 2), ("boom", "killed (timeout)", 2)]
    assert [text for _, text in seen[1:]] == ["a = 1\nx = 2\n", "a = 1\nx = (1)\n", "a = 1\nx = 3\n"]
    assert (tmp_path / "pkg" / "mod.py").read_text() == "a = 1\nx = 1\n"
    assert not list(tmp_path.rglob("*" + gm.BACKUP_SUFFIX))
    assert json.loads((tmp_path / "out" / "gpu_mutants.json").read_text()) == report
    summary = (tmp_path / "out" / "gpu_mutants.txt").read_text()
    assert "killed 2, survived 1" in summary and "survived" in summary.splitlines()[3]


def test_a_failing_or_skipped_baseline_runs_no_mutant(tmp_path):
    mutants = _tree(tmp_path)
    for base in (gm.TestRun(1, 1.0, passed=2, failed=1), gm.TestRun(0, 1.0, passed=2, skipped=1)):
        runs = []
        report = gm.mutation_pass(tmp_path, mutants, lambda tests: runs.append(tests) or base, tmp_path / "out",
                                  log=lambda s: None)
        assert not report["baseline"]["ok"] and report["mutants"] == [] and len(runs) == 1


def test_the_file_is_restored_when_a_run_raises_and_after_a_killed_run(tmp_path):
    m = _tree(tmp_path)[0]
    path = tmp_path / m.path
    with pytest.raises(KeyboardInterrupt):
        with gm.mutated(tmp_path, m):
            assert path.read_text() == "a = 1\nx = 2\n"
            raise KeyboardInterrupt
    assert path.read_text() == "a = 1\nx = 1\n" and not (tmp_path / (m.path + gm.BACKUP_SUFFIX)).exists()
    (tmp_path / (m.path + gm.BACKUP_SUFFIX)).write_text("a = 1\nx = 1\n")  # a run killed with SIGKILL
    path.write_text("a = 1\nx = 2\n")
    gm.recover(tmp_path, [m], log=lambda s: None)
    assert path.read_text() == "a = 1\nx = 1\n" and not (tmp_path / (m.path + gm.BACKUP_SUFFIX)).exists()


def test_a_spent_budget_leaves_the_rest_unrun(tmp_path):
    mutants = _tree(tmp_path)
    report = gm.mutation_pass(tmp_path, mutants, lambda tests: gm.TestRun(0, 0.0, passed=len(tests)),
                              tmp_path / "out", budget=0.0, log=lambda s: None)
    assert [r["outcome"] for r in report["mutants"]] == ["not run (budget spent)"] * 3


@pytest.mark.parametrize("run, want", [
    (gm.TestRun(0, 1, passed=3), "survived"),
    (gm.TestRun(0, 1, passed=2, skipped=1), "error (tests skipped or not collected)"),
    (gm.TestRun(0, 1), "error (tests skipped or not collected)"),
    (gm.TestRun(1, 1, passed=1, failed=1), "killed"),
    (gm.TestRun(2, 1), "killed (collection error or interrupted)"),
    (gm.TestRun(None, 1), "killed (timeout)"),
    (gm.TestRun(-11, 1), "killed (crashed: signal 11)"),
    (gm.TestRun(4, 1), "error (pytest exit status 4)"),
    (gm.TestRun(5, 1), "error (pytest exit status 5)")])
def test_outcomes(run, want):
    assert gm.outcome(run) == want


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_the_pass_refuses_and_the_dry_run_works(tmp_path):
    run = subprocess.run([sys.executable, "tools/gpu_mutants.py", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 2 and "refusing to run" in run.stderr and "--dry-run" in run.stderr
    assert not list(tmp_path.iterdir())
    dry = subprocess.run([sys.executable, "tools/gpu_mutants.py", "--dry-run"], cwd=ROOT, capture_output=True,
                         text=True)
    assert dry.returncode == 0 and f"{len(gm.MUTANTS)} of {len(gm.MUTANTS)} mutants apply" in dry.stdout


def test_the_pytest_runner_counts_outcomes_and_stops_a_run_at_its_timeout(tmp_path):
    (tmp_path / "test_x.py").write_text(
        "import time, pytest\n"
        "def test_pass():\n    pass\n"
        "@pytest.mark.skip(reason='no')\ndef test_skip():\n    pass\n"
        "def test_fail():\n    assert False\n"
        "def test_slow():\n    time.sleep(60)\n")
    run_tests = gm.pytest_runner(tmp_path, sys.executable, timeout=4)
    run = run_tests(["test_x.py::test_pass", "test_x.py::test_skip"])
    assert (run.rc, run.passed, run.failed, run.skipped) == (0, 1, 0, 1)
    run = run_tests(["test_x.py::test_fail"])
    assert (run.rc, run.passed, run.failed) == (1, 0, 1) and "assert False" in run.tail
    run = run_tests(["test_x.py::test_slow"])
    assert run.rc is None and run.seconds < 30 and gm.outcome(run) == "killed (timeout)"


def _bitonic_order(keys: list, descending: bool) -> list[int]:
    """The order torch's CUDA sort gives with stable=False for at most 32 keys: Sort.cu's SmallBitonicSort, i.e.
    SortUtils.cuh's bitonicSortKVInPlace (16 threads x 2 keys, invalid padding after the keys; bitonicSwap swaps
    a pair when `(comp(a, b) && valid_a) || !valid_b` equals the pass's direction, so equal keys move)."""
    n, P = len(keys), 32
    k, v, ok = list(keys) + [0] * (P - n), list(range(n)) + [0] * (P - n), [True] * n + [False] * (P - n)
    comp = (lambda a, b: a > b) if descending else (lambda a, b: a < b)

    def swap(i, j, direction):
        if ((comp(k[i], k[j]) and ok[i]) or not ok[j]) == direction:
            k[i], k[j], v[i], v[j], ok[i], ok[j] = k[j], k[i], v[j], v[i], ok[j], ok[i]

    build = [(size, size >> i) for size in (2, 4, 8, 16) for i in range(1, size.bit_length())]  # (size, stride)
    for size, stride in build + [(None, stride) for stride in (16, 8, 4, 2, 1)]:  # then the final merge
        for t in range(16):
            pos = 2 * t - (t & (stride - 1))
            swap(pos, pos + stride, size is not None and (t & (size // 2)) != 0)
    return v[:n]


_SORT = torch.sort


def _cuda_like_sort(x, descending=False, stable=False):
    if stable or not 1 < x.numel() <= 32:  # CUDA's other sorts are stable, like the CPU's
        return _SORT(x, descending=descending, stable=True)
    order = torch.tensor(_bitonic_order(x.tolist(), descending))
    return types.SimpleNamespace(values=x[order], indices=order)


def _module_with(tmp_path, m: gm.Mutant):
    path = tmp_path / (m.id.replace("-", "_") + ".py")
    path.write_text((ROOT / m.path).read_text().replace(m.original, m.replacement))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gpu_tie_cases_tell_cudas_unstable_small_sort_apart(monkeypatch, tmp_path):
    """The GPU tests of the stable sorts are only as good as their ties: under the model of the bitonic network
    CUDA runs for stable=False (at most 32 keys), every tie case of the capacity rule and every repeated-expert
    step of the device bookkeeping gives another result with either sort unstable, and the same with both stable."""
    import moesys.layers.router as router
    import moesys.offload.device_cache as device_cache
    from tests.test_gpu_survivors import REPEATED_STEPS, _cache, _kept_by_the_tie_rule, tie_cases

    g = torch.Generator().manual_seed(0)
    for n in range(2, 33):  # the model is a sort
        keys = torch.randint(0, 4, (n,), generator=g)
        for descending in (False, True):
            order = _bitonic_order(keys.tolist(), descending)
            assert sorted(order) == list(range(n))
            assert torch.equal(keys[order], keys.sort(descending=descending, stable=True).values)
    assert _bitonic_order([0] * 8, False) != list(range(8))  # that moves equal keys
    unstable = {m.id: _module_with(tmp_path, m) for m in gm.MUTANTS if m.id.endswith("-unstable")}
    assert len(unstable) == 3
    monkeypatch.setattr(torch, "sort", _cuda_like_sort)
    for ids, score, E, capacity in tie_cases():
        want = _kept_by_the_tie_rule(ids, score, E, capacity)
        assert torch.equal(router.keep_top_per_expert(ids, score, E, capacity), want)
        for name in ("router-sort-by-score-unstable", "router-sort-by-expert-unstable"):
            assert not torch.equal(unstable[name].keep_top_per_expert(ids, score, E, capacity), want), name
    for policy in ("lru", "lfu"):
        tables = [module.DeviceCacheTables(_cache("cpu", policy), policy)
                  for module in (device_cache, unstable["device-cache-first-occurrence-unstable"])]
        for row, ids in REPEATED_STEPS:
            stable, mutant = (t.step(row, torch.tensor(ids), use_kernel=False, distinct=False) for t in tables)
            assert not all(torch.equal(a, b) for a, b in zip(stable, mutant)), (policy, row, ids)
