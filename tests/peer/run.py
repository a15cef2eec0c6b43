"""Run transformers' own modeling tests for MoE architectures twice: default experts, then moesys.

    python tests/peer/run.py --transformers-src /path/to/transformers --models mixtral,qwen2_moe

For each architecture it runs `tests/models/<arch>/test_modeling_<arch>.py` of the given source checkout
with pytest (no -x, no xdist, OMP_NUM_THREADS=1), once as is and once with the plugin moesys_default.py
(moesys becomes the default experts implementation), reads both JUnit XML reports and prints, per
architecture: tests run, passed with default, passed with moesys, and the regressions (passed with the
default, did not pass with moesys) with their first error line. Exit status 1 when any regression exists.
Opt-in: tests/conftest.py keeps the default pytest run out of tests/peer.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parents[1]
MODELS = ("mixtral,qwen2_moe,qwen3_moe,olmoe,deepseek_v3,gpt_oss,qwen3_next,glm4_moe,jamba,phimoe,nemotron_h,"
          "deepseek_v2,qwen3_5_moe,ernie4_5_moe,granitemoe,minimax")


def outcomes(junit_xml: Path) -> dict[str, tuple[str, str]]:
    """test id -> (outcome, first message line) from a pytest JUnit report; outcome in passed/failed/skipped."""
    result = {}
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = "skipped" if tag == "skipped" else "failed"
                message = (node.get("message") or node.text or "").strip().splitlines()[:1]
                message = message[0][:300] if message else ""
                break
        result[test_id] = (outcome, message)
    return result


def run_suite(src: Path, test_file: Path, report: Path, moesys: bool, extra: list[str], timeout: int) -> int:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # moesys from this checkout, transformers installed (the source checkout supplies only its tests/).
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(PROJECT), str(src)])
    cmd = [sys.executable, "-m", "pytest", str(test_file), "-p", "no:cacheprovider", "-q", "-rN",
           f"--junitxml={report}", f"--timeout={timeout}", "--rootdir", str(src)]
    if moesys:
        cmd += ["-p", "moesys_default"]
    return subprocess.run(cmd + extra, cwd=src, env=env).returncode


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transformers-src", type=Path, required=True, help="a transformers source checkout")
    parser.add_argument("--models", default=MODELS, help="comma-separated tests/models/<arch> names")
    parser.add_argument("-k", dest="keyword", default=None, help="pytest -k expression, e.g. to skip slow families")
    parser.add_argument("--timeout", type=int, default=300, help="per-test timeout (pytest-timeout)")
    parser.add_argument("--out", type=Path, default=None, help="where to keep the JUnit reports")
    args = parser.parse_args(argv)
    src = args.transformers_src.resolve()
    if not (src / "tests" / "test_modeling_common.py").is_file():
        raise ValueError(f"--transformers-src {src}: no tests/test_modeling_common.py there; give the root of a "
                         "transformers source checkout")
    out = args.out or Path(tempfile.mkdtemp(prefix="moesys-peer-"))
    out.mkdir(parents=True, exist_ok=True)
    extra = ["-k", args.keyword] if args.keyword else []
    rows, any_regression = [], False
    for arch in [m.strip() for m in args.models.split(",") if m.strip()]:
        test_file = src / "tests" / "models" / arch / f"test_modeling_{arch}.py"
        if not test_file.is_file():
            print(f"[{arch}] missing {test_file}; not run", flush=True)
            rows.append((arch, "missing", "", "", ""))
            continue
        runs = {}
        for moesys in (False, True):
            report = out / f"{arch}-{'moesys' if moesys else 'default'}.xml"
            print(f"[{arch}] {'moesys' if moesys else 'default'} ...", flush=True)
            run_suite(src, test_file, report, moesys, extra, args.timeout)
            runs[moesys] = outcomes(report) if report.is_file() else {}
        base, ours = runs[False], runs[True]
        regressions = sorted(t for t, (o, _) in base.items() if o == "passed" and ours.get(t, ("absent",))[0] != "passed")
        any_regression |= bool(regressions)
        passed = lambda r: sum(o == "passed" for o, _ in r.values())  # noqa: E731
        rows.append((arch, str(len(base)), str(passed(base)), str(passed(ours)), str(len(regressions))))
        for t in regressions:
            print(f"  REGRESSION {t}: {ours.get(t, ('absent', 'not run'))[1]}")
    print("\n| architecture | tests run | passed default | passed moesys | regressions |\n|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"JUnit reports: {out}")
    return 1 if any_regression else 0


if __name__ == "__main__":
    sys.exit(main())
