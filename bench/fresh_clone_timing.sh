#!/bin/bash
# Fresh-clone timing of the README's two commands (README "The two commands"), as a new user runs them:
# each command in its own clone with a new venv and an empty pip cache, the clone beside a shared/ link
# as CI has it. One line per command is appended to the log.
#   usage: bench/fresh_clone_timing.sh REPO COMMIT WORKDIR SHARED LOG     (run it 3 times, nothing else running)
#   e.g.   for n in 1 2 3; do bench/fresh_clone_timing.sh /work/main HEAD /tmp/fc$n /work/shared fresh.log; done
set -u
repo=$1; commit=$2; base=$3; shared=$4; log=$(realpath -m "$5")
rm -rf "$base"; mkdir -p "$base"; ln -s "$shared" "$base/shared"
for what in demo tests; do
  d=$base/$what; git clone -q "$repo" "$d"; cd "$d" && git checkout -q "$commit"
  export PIP_CACHE_DIR=$base/pipcache-$what
  extra=""; [ $what = tests ] && extra="[test]"
  start=$(date +%s)
  python3 -m venv .venv && .venv/bin/pip install -q -c constraints-cpu.txt -e ".$extra" > install.log 2>&1
  rc=$?; installed=$(date +%s)
  if [ $rc -eq 0 ]; then
    if [ $what = demo ]; then .venv/bin/snakemake --cores 2 > run.log 2>&1; else .venv/bin/python -m pytest > run.log 2>&1; fi
    rc=$?
  fi
  end=$(date +%s)
  echo "$what commit $(git rev-parse --short HEAD) rc=$rc total $((end-start)) s install $((installed-start)) s" \
       "rest $((end-installed)) s $(date -u +%F' '%H:%M) UTC | $(tail -1 run.log 2>/dev/null)" >> "$log"
done
