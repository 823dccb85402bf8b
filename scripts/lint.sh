#!/usr/bin/env bash
# Readability checks that keep the code as short as the style guide asks, each listing its offenders:
#   1. clang-format: every *.hpp / *.cpp under include/ examples/ tools/ tests/ benchmarks/ is formatted
#      (clang-format --dry-run --Werror with the repository's .clang-format);
#   2. header length: no header under include/ is longer than LORA_LINT_MAX_HEADER_LINES (700) lines;
#   3. clang-tidy with readability-function-size (a body over 80 lines or 120 statements) and
#      readability-function-cognitive-complexity (over 25), thresholds from .clang-tidy, plus the cheap
#      checks of .clang-tidy that the headers pass today (naming, definitions in headers, nullptr,
#      override, unused using-declarations), on tests/lint_all_headers.cpp: the one translation unit that
#      includes every header, so each function of include/ is seen once (templates too, instantiated or
#      not), compiled with the flags of a unit test from compile_commands.json; the MPI headers under
#      include/lora/dist/ in tests/mpi/lint_dist_headers.cpp, with mpicxx's flags added.
# Runs every check, then exits 1 if any failed. Installs clang-format, clang-tidy and python3 through setup.sh.
# The flags come from build/lint, configured here (tests on, nothing built), or from the existing
# compile_commands.json of LORA_LINT_BUILD_DIR (e.g. build/release), which is then left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
scripts/setup.sh clang-format clang-tidy python3  # python3 reads compile_commands.json and clang-tidy output
# (setup.sh also installs OpenMPI, whose mpicxx gives the flags of include/lora/dist/.)

max_header_lines=${LORA_LINT_MAX_HEADER_LINES:-700}
build=${LORA_LINT_BUILD_DIR:-build/lint}
jobs=$(nproc)
failed=()
report=$(mktemp -d)
trap 'rm -rf "$report"' EXIT

# offenders LIST CHECK HEADING [OK]: prints the offenders in file LIST (one a line) under HEADING and
# records CHECK as failed, or prints OK when LIST is empty.
offenders() {
  if [ -s "$1" ]; then
    echo "$3"
    sed 's/^/  /' "$1"
    failed+=("$2: $(wc -l <"$1") offender(s)")
  elif [ $# -ge 4 ]; then
    echo "$4"
  fi
}

# --- 1. clang-format --------------------------------------------------------------------------------
echo "--- clang-format (include examples tools tests benchmarks)"
find include examples tools tests benchmarks -type f \( -name '*.hpp' -o -name '*.cpp' \) -print0 2>/dev/null |
  LC_ALL=C sort -z >"$report/sources"
# One clang-format per file, in parallel; a file is an offender when clang-format would change it.
xargs -0 -P "$jobs" -n 1 sh -c 'clang-format --dry-run --Werror "$1" >/dev/null 2>&1 || echo "$1"' sh \
  <"$report/sources" | LC_ALL=C sort >"$report/unformatted"
offenders "$report/unformatted" clang-format "not formatted (run clang-format -i on them):" \
  "all $(tr -cd '\0' <"$report/sources" | wc -c) files formatted"

# --- 2. header length -------------------------------------------------------------------------------
echo "--- header length (at most $max_header_lines lines under include/)"
find include -type f -name '*.hpp' -print0 | LC_ALL=C sort -z | xargs -0 wc -l |
  awk -v max="$max_header_lines" '$2 != "total" && $1 > max { printf "%s: %d lines\n", $2, $1 }' \
    >"$report/long_headers"
offenders "$report/long_headers" "header length" \
  "headers over $max_header_lines lines (split them, one concept per header):" "no header over $max_header_lines lines"

# --- 3. clang-tidy: function size and cognitive complexity ------------------------------------------
echo "--- clang-tidy (function size and cognitive complexity; naming, definitions in headers)"
tu=tests/lint_all_headers.cpp
# MPI's headers are needed by include/lora/dist/ only: those are checked in a second translation unit,
# compiled with the flags of mpicxx.
mpi_tu=tests/mpi/lint_dist_headers.cpp
# The translation units must include every header, or a new header would escape the check.
find include -type f -name '*.hpp' | sed 's|^include/||' | LC_ALL=C sort >"$report/headers"
sed -n 's|^#include <\(lora/.*\.hpp\)>$|\1|p' "$tu" "$mpi_tu" | LC_ALL=C sort >"$report/included"
LC_ALL=C comm -23 "$report/headers" "$report/included" >"$report/not_included"
offenders "$report/not_included" "$tu" "$tu and $mpi_tu do not include (add an #include line for each):"

# Compiler flags of a unit test (include paths, macros, standard), without its warnings, PCH or -march.
if [ -z "${LORA_LINT_BUILD_DIR:-}" ]; then
  cmake -S . -B "$build" -G Ninja -DCMAKE_EXPORT_COMPILE_COMMANDS=ON -DLORA_BUILD_TESTS=ON \
    -DLORA_BUILD_EXAMPLES=OFF -DLORA_BUILD_TOOLS=OFF -DLORA_BUILD_BENCHMARKS=OFF >/dev/null
elif [ ! -f "$build/compile_commands.json" ]; then
  echo "lint: no $build/compile_commands.json (configure it with tests on, or unset LORA_LINT_BUILD_DIR)" >&2
  exit 2
fi
python3 - "$build/compile_commands.json" >"$report/flags" <<'EOF'
import json, re, shlex, sys
entries = json.load(open(sys.argv[1]))
tests = [e for e in entries if re.search(r"/tests/test_[^/]*\.cpp$", e["file"])]
if not tests:
    sys.exit("lint: no tests/test_*.cpp in " + sys.argv[1])
args = tests[0].get("arguments") or shlex.split(tests[0]["command"])
keep, take_next = [], False
for a in args:
    if take_next:
        keep.append(a)
        take_next = False
    elif a in ("-I", "-isystem", "-D"):
        keep.append(a)
        take_next = True
    elif a.startswith(("-I", "-isystem", "-D", "-std=")):
        keep.append(a)
if not any(a.startswith("-std=") for a in keep):
    keep.append("-std=c++17")  # g++ >= 11 defaults to C++17, so CMake leaves the flag out; clang-tidy needs it
print("\n".join(keep))
EOF
mapfile -t flags <"$report/flags"
# The two size checks, plus the cheap checks of .clang-tidy that the headers already pass (naming, ODR-safe
# definitions in headers, nullptr, override, unused using-declarations), so that they stay passed.
checks='-*,readability-function-size,readability-function-cognitive-complexity,readability-identifier-naming'
checks+=',misc-definitions-in-headers,misc-unused-using-decls,modernize-use-nullptr,modernize-use-override'
tidy_start=$(date +%s)
clang-tidy --quiet --checks="$checks" --header-filter='include/lora/.*' "$tu" -- "${flags[@]}" \
  -Wno-unknown-warning-option >"$report/tidy.out" 2>"$report/tidy.err" || {
  echo "clang-tidy could not analyse $tu:"
  cat "$report/tidy.err" "$report/tidy.out"
  failed+=("clang-tidy: did not run")
}
mapfile -t mpi_flags < <(mpicxx --showme:compile | tr ' ' '\n' | grep -v '^$')
clang-tidy --quiet --checks="$checks" --header-filter='include/lora/.*' "$mpi_tu" -- "${flags[@]}" "${mpi_flags[@]}" \
  -DOMPI_SKIP_MPICXX -Wno-unknown-warning-option >>"$report/tidy.out" 2>"$report/tidy_mpi.err" || {
  echo "clang-tidy could not analyse $mpi_tu:"
  cat "$report/tidy_mpi.err"
  failed+=("clang-tidy: did not run on $mpi_tu")
}
# One line per offender: file:line: function: what exceeds which threshold (or: the other check's message).
python3 - "$report/tidy.out" >"$report/functions" <<'EOF'
import os, re, sys
found = {}  # (file, line, name) -> [what, ...]
key = None
warning = re.compile(r"(.+?):(\d+):\d+: warning: function '(.+?)' (exceeds|has cognitive complexity of (\d+))")
other = re.compile(r"(.+?):(\d+):\d+: warning: (.*)$")
note = re.compile(r".+?: note: (\d+) (lines|statements|branches|nesting|parameters|variables)")
for text in open(sys.argv[1], errors="replace"):
    m = warning.match(text)
    if m:
        key = (os.path.relpath(os.path.normpath(m.group(1))), int(m.group(2)), m.group(3))
        found.setdefault(key, [])
        if m.group(5):
            found[key].append("cognitive complexity " + m.group(5))
        continue
    m = other.match(text)
    if m:
        key = None
        found.setdefault((os.path.relpath(os.path.normpath(m.group(1))), int(m.group(2)), m.group(3)), [])
        continue
    m = note.match(text)
    if m and key is not None:
        found[key].append(m.group(1) + " " + m.group(2))
for (path, line, name), what in sorted(found.items()):
    print(f"{path}:{line}: {name}" + (": " + ", ".join(what) if what else ""))
EOF
offenders "$report/functions" clang-tidy \
  "functions over the thresholds of .clang-tidy (split them), and other clang-tidy warnings:" \
  "no function over the thresholds, no other warning"
echo "(clang-tidy: $(($(date +%s) - tidy_start)) s)"

echo "--- lint: $(($(date +%s) - start)) s"
if [ ${#failed[@]} -gt 0 ]; then
  printf 'lint FAILED:\n'
  printf '  %s\n' "${failed[@]}"
  exit 1
fi
echo "lint passed"
