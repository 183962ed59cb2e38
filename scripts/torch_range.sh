#!/usr/bin/env bash
# Release check: does one built wheel serve every torch the project claims (pyproject: torch>=2.4)?
#
# Installs WHEEL, as built (no rebuild), into a fresh virtualenv per torch version, with that
# torch pinned, and runs the op tests (tests/flower_ext) there, from outside the checkout so that
# the source folder cannot shadow the installed package. Each virtualenv is kept under WORKDIR and
# reused by a later run, so checking a new wheel does not download torch again. Prints one line
# per version and writes them to WORKDIR/results.md.
#
# These downloads are gigabytes (PyPI's Linux torch wheels bring the CUDA libraries): a release
# check, not part of CI. This machine's pip may cap torch at the releases on its disk; the check
# ignores pip's configuration files so that any release can be asked for.
#
#   pip wheel --no-deps -w dist .
#   scripts/torch_range.sh --workdir /tmp/torch-range dist/flower_ext-*.whl 2.4.0 2.15.0
set -euo pipefail

usage() { echo "usage: $0 [--workdir DIR] WHEEL TORCH_VERSION [TORCH_VERSION ...]" >&2; exit 2; }

workdir="${TMPDIR:-/tmp}/flower-ext-torch-range"
if [[ "${1:-}" == "--workdir" ]]; then
  [[ $# -ge 2 ]] || usage
  workdir="$2"
  shift 2
fi
[[ $# -ge 2 ]] || usage
wheel="$(realpath "$1")"
shift
[[ -f "$wheel" ]] || { echo "$0: no such wheel: $wheel" >&2; exit 2; }
tests="$(realpath "$(dirname "$0")/../tests")"
mkdir -p "$workdir"
results="$workdir/results.md"
echo "| torch | python | op tests (tests/flower_ext) |" > "$results"
echo "|---|---|---|" >> "$results"

export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
failed=0
for version in "$@"; do
  venv="$workdir/torch-$version"
  if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "torch==$version"
  fi
  constraint="$workdir/torch-$version.txt"
  echo "torch==$version" > "$constraint"
  # The test extra's other packages must not move torch: the pin is a constraint, so pip fails
  # rather than replace it.
  "$venv/bin/pip" install --quiet --force-reinstall --no-deps "$wheel"
  "$venv/bin/pip" install --quiet --constraint "$constraint" "${wheel}[test]"
  python_version="$("$venv/bin/python" -c 'import platform; print(platform.python_version())')"
  log="$workdir/torch-$version.log"
  if (cd "$workdir" && "$venv/bin/pytest" "$tests/flower_ext" -q -p no:cacheprovider) > "$log" 2>&1; then
    outcome="$(tail -n 1 "$log")"
  else
    outcome="FAILED: $(tail -n 1 "$log") (see $log)"
    failed=1
  fi
  line="| $version | $python_version | $outcome |"
  echo "$line"
  echo "$line" >> "$results"
done
exit "$failed"
