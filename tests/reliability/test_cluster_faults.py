"""Faults of a run on a cluster or a shared folder: a job failing on its node, two runs on one folder."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from reliability.cluster_helpers import FAILING, FAILING_LOG, FLAKY, snapshot
from workflow_helpers import REPO, snakemake, workflow_copy

SHARDED_RULES = ("infer", "uncertainty", "crf_fusion")


def job_ids(stderr: str) -> dict[str, str]:
    """Output file -> Snakemake job id, from the job announcements of a run's log."""
    announced = re.finditer(r"^\s*(?:local)?rule \w+:\n((?:\s{4}.*\n)+)", stderr, flags=re.M)
    ids = {}
    for block in announced:
        output = re.search(r"^\s+output: (.*)$", block.group(1), flags=re.M)
        jobid = re.search(r"^\s+jobid: (\d+)$", block.group(1), flags=re.M)
        if output and jobid:
            ids.update({path: jobid.group(1) for path in output.group(1).split(", ")})
    return ids


def job_counts(stderr: str) -> dict[str, int]:
    """Rule -> number of jobs, from the first "Job stats" table of a run's log."""
    table = stderr.split("Job stats:\n", 1)[1].split("\n\n", 1)[0].splitlines()[2:]  # skip header, rule
    return {rule: int(count) for rule, count in (line.split() for line in table)}


@pytest.mark.slow
def test_a_job_failing_once_is_resubmitted_as_the_profile_says(cluster_run):
    if cluster_run.retries == 0:
        pytest.skip("the SLURM profile sets retries: 0 (no resubmission)")
    first = cluster_run.first.stderr
    flaky = job_ids(first)[FLAKY]
    assert f"Trying to restart job {flaky}." in first
    assert FLAKY in cluster_run.before  # it succeeded on its next attempt, within the same run


@pytest.mark.slow
def test_a_job_failing_every_attempt_stops_the_run_and_the_rerun_redoes_only_its_shard(cluster_run, tiny_run):
    first, rerun = cluster_run.first, cluster_run.rerun
    failing = job_ids(first.stderr)[FAILING]
    assert first.returncode != 0
    assert first.stderr.count(f"Trying to restart job {failing}.") == cluster_run.retries
    assert re.search(rf"Error in rule infer:\n(?:\s+.*\n)*?\s+jobid: {failing}\n", first.stderr)
    # keep-going: every job that does not need the failed shard finished in the first run
    assert FAILING not in cluster_run.before
    for shard in (0, 2, 3, 4, 5):
        for stage in ("inference", "uncertainty", "crf"):
            assert f"results/{stage}/test/shard-{shard}-of-6.h5" in cluster_run.before, (stage, shard)

    assert rerun.returncode == 0, rerun.stderr[-5000:]
    counts = job_counts(rerun.stderr)
    assert {rule: counts.get(rule) for rule in SHARDED_RULES} == dict.fromkeys(SHARDED_RULES, 1), counts
    assert "train_ddpm" not in counts and "calibrate" not in counts, counts
    after = snapshot(cluster_run.wf)
    rewritten = {path for path, stamp in cluster_run.before.items() if after[path] != stamp}
    assert rewritten <= {FAILING_LOG}  # no other file of the first run was written again (mtime and content)
    assert (tiny_run / "results/metrics/table.md").read_text() == (cluster_run.wf / "results/metrics/table.md").read_text()


LOCK_MESSAGE = "Error: Directory cannot be locked."


@pytest.mark.slow
def test_a_second_run_on_the_same_folder_and_a_stale_lock_are_refused(tmp_path):
    """Run 1 waits on a queue that never starts its jobs; run 2 (same folder, same files) is refused.
    Killing run 1 leaves its lock: refused again until `snakemake --unlock`.

    The target is a rule that runs on the (never starting) queue: run 1 may finish the local rule
    make_demo_data before it is killed, but never the dataset, so every later run still has work to do."""
    wf = workflow_copy(tmp_path / "wf")
    target = "results/data/dataset.h5"
    queued = subprocess.Popen(
        [sys.executable, "-m", "snakemake", "--cores", "1", "--executor", "cluster-generic", "--jobs", "1",
         "--cluster-generic-submit-cmd", "echo 1; true", "--configfile", "test.yaml"],
        cwd=wf, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not any((wf / ".snakemake/locks").glob("*.lock")):
            assert queued.poll() is None, "run 1 ended before taking its lock"
            assert time.monotonic() < deadline, "run 1 took no lock in 300 s"
            time.sleep(0.1)
        second = snakemake(wf, target)
        assert queued.poll() is None  # run 1 still holds the folder
    finally:
        os.killpg(queued.pid, signal.SIGKILL)
        queued.wait()
    assert second.returncode != 0 and LOCK_MESSAGE in second.stderr, second.stderr[-3000:]
    assert "--unlock" in second.stderr

    stale = snakemake(wf, target)
    assert stale.returncode != 0 and LOCK_MESSAGE in stale.stderr, stale.stderr[-3000:]
    assert snakemake(wf, "--unlock").returncode == 0
    after_unlock = snakemake(wf, target)
    assert after_unlock.returncode == 0, after_unlock.stderr[-3000:]
    assert (wf / target).is_file()
