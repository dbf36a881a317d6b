#!/usr/bin/env bash
# Stands in for sbatch in tests: runs the job script detached, prints a job id, returns at once.
#
# Fault injection: if FAKE_SBATCH_FAULTS names a folder, each `*.fault` file in it holds a string to find
# in the job script (line 1, e.g. the job's `"output": [...]` property) and how many more submissions of
# that job are to fail (line 2). A failing submission runs the job script with its Snakemake command
# replaced by `false`, as a job that dies on its node: the job script writes its failure marker, exits 1,
# and Snakemake sees the job fail.
jobscript="${@: -1}"
if [ -n "${FAKE_SBATCH_FAULTS:-}" ]; then
  exec 9>"$FAKE_SBATCH_FAULTS/.lock" && flock 9  # Snakemake may submit several jobs at once
  for plan in "$FAKE_SBATCH_FAULTS"/*.fault; do
    [ -e "$plan" ] || continue
    { IFS= read -r pattern; read -r left; } < "$plan"
    if [ "$left" -gt 0 ] && grep -qF -- "$pattern" "$jobscript"; then
      printf '%s\n%s\n' "$pattern" "$((left - 1))" > "$plan"
      sed -i 's#[^ ]* -m snakemake .* && touch #false \&\& touch #' "$jobscript"
      grep -q '&& false && touch ' "$jobscript" || { echo "fake sbatch: cannot inject a failure into $jobscript" >&2; exit 1; }
      break
    fi
  done
  exec 9>&-
fi
setsid nohup bash "$jobscript" > "$jobscript.out" 2>&1 < /dev/null &
echo "$!"
