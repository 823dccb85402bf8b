#!/usr/bin/env bash
# expect_abort.sh MAX_SECONDS REGEX COMMAND...: runs COMMAND (an mpirun of a job that must fail) and passes
# only when it exits non-zero, within MAX_SECONDS, and its output (stdout and stderr) matches the
# extended regular expression REGEX. A hang is cut at 3 x MAX_SECONDS by timeout(1) and fails.
set -u
if [ $# -lt 3 ]; then
  echo "usage: $0 MAX_SECONDS REGEX COMMAND..." >&2
  exit 2
fi
max=$1
regex=$2
shift 2
log=$(mktemp)
trap 'rm -f "$log"' EXIT
start=$(date +%s%N)
timeout --kill-after=5 $((max * 3)) "$@" >"$log" 2>&1
rc=$?
elapsed_ms=$((($(date +%s%N) - start) / 1000000))
cat "$log"
echo "---- exit code $rc after ${elapsed_ms} ms (bound ${max} s)"
fail=0
if [ "$rc" -eq 0 ]; then
  echo "FAIL: the job exited 0; it had to fail"
  fail=1
elif [ "$rc" -eq 124 ] || [ "$elapsed_ms" -ge $((max * 3000)) ]; then
  echo "FAIL: the job hung and was killed by timeout"  # (mpirun itself exits 137 after a rank's SIGKILL)
  fail=1
fi
if [ "$elapsed_ms" -gt $((max * 1000)) ]; then
  echo "FAIL: the job took ${elapsed_ms} ms, more than ${max} s"
  fail=1
fi
if ! grep -Eq -- "$regex" "$log"; then
  echo "FAIL: the output does not match /$regex/"
  fail=1
fi
[ "$fail" -eq 0 ] && echo "PASS: failed with exit code $rc within ${elapsed_ms} ms, output matches /$regex/"
exit "$fail"
