#!/usr/bin/env bash
# Stands in for sbatch in tests: runs the job script detached, prints a job id, returns at once.
jobscript="${@: -1}"
setsid nohup bash "$jobscript" > "$jobscript.out" 2>&1 < /dev/null &
echo "$!"
