#!/usr/bin/env bash
# Mutation testing of one moesys module with its own test files (cosmic-ray over pytest).
#
#   tools/mutate.sh MODULE.py[:NAME,NAME...] TEST_FILE [TEST_FILE...]
#   e.g. tools/mutate.sh moesys/layers/router.py tests/test_router.py
#        tools/mutate.sh moesys/train.py:lr_at,build_optimizer tests/test_train_schedule.py
#
# With :NAMES only the mutants inside those functions / classes / Class.methods run (the rest of the
# module is skipped; tools/mutate_select.py).
# The tree (tracked and untracked, not ignored files) is copied to a scratch directory and mutated
# there, one mutant at a time, so an interrupted run never leaves a mutant in your checkout. Results
# go to .mutation/<module>.sqlite (gitignored); running the same command again resumes the pending
# mutants. At the end the surviving mutants are printed as diffs: kill each with a test, or record in
# docs/TESTING.md why it is equivalent. Operators that only produce noise here (bitwise and shift
# operators as replacements, `-x` -> `~x`/`not x`) are filtered out; see EXCLUDE below.
#
# Environment: PYTHON (default: python), MUTATE_TIMEOUT seconds per mutant (default 300).
set -euo pipefail
if [ $# -lt 2 ]; then
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
module=${1%%:*}; select=""
case "$1" in *:*) select=${1#*:};; esac
shift
tests=("$@")
repo=$(git rev-parse --show-toplevel)
py=${PYTHON:-python}
bin=$(dirname "$("$py" -c 'import sys; print(sys.executable)')")
[ -x "$bin/cosmic-ray" ] || { echo "tools/mutate.sh: cosmic-ray is not installed for $py (pip install cosmic-ray)" >&2; exit 2; }
cd "$repo"
[ -f "$module" ] || { echo "tools/mutate.sh: no module $module" >&2; exit 2; }
for t in "${tests[@]}"; do [ -e "${t%%::*}" ] || { echo "tools/mutate.sh: no test file $t" >&2; exit 2; }; done

name=$(echo "${module%.py}" | tr '/' '.')${select:+.$(echo "$select" | tr ',' '+')}
# a long selection would exceed the file system's 255-byte names: keep its start and a hash of the whole
[ ${#name} -le 150 ] || name="${name:0:130}.$(printf %s "$name" | sha1sum | cut -c1-12)"
out="$repo/.mutation"
mkdir -p "$out"
work=$(mktemp -d "${TMPDIR:-/tmp}/moesys-mutate.XXXXXX")
trap 'rm -rf "$work"' EXIT
git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$work"

config="$out/$name.toml"
cat > "$config" <<TOML
[cosmic-ray]
module-path = "$module"
timeout = ${MUTATE_TIMEOUT:-300}
excluded-modules = []
test-command = "$py -m pytest -x -q -p no:cacheprovider ${tests[*]}"

[cosmic-ray.distributor]
name = "local"

[cosmic-ray.filters.operators-filter]
# EXCLUDE: replacements by bitwise/shift/modulo/power operators and by floor division mostly give
# type errors or duplicates of the arithmetic swaps kept; -x -> ~x / not x likewise.
exclude-operators = [
    "core/ReplaceBinaryOperator_.*_(BitXor|BitAnd|BitOr|LShift|RShift|Mod|Pow|FloorDiv)",
    "core/ReplaceUnaryOperator_USub_(Invert|Not)",
    "core/ReplaceComparisonOperator_(Lt|LtE|Gt|GtE|Eq|NotEq)_(Is|IsNot)",
]
TOML
session="$out/$name.sqlite"
cd "$work"
export PYTHONPATH="$work" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ ! -f "$session" ]; then
    "$bin/cosmic-ray" init "$config" "$session"
    "$bin/cr-filter-operators" "$session" "$config"
    if [ -n "$select" ]; then "$py" "$repo/tools/mutate_select.py" "$session" "$module" "$select"; fi
fi
"$bin/cosmic-ray" baseline "$config" >/dev/null || { echo "tools/mutate.sh: the tests fail without any mutation" >&2; exit 1; }
"$bin/cosmic-ray" exec "$config" "$session"
"$bin/cr-report" "$session" --surviving-only --show-diff
