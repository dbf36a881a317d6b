"""Fixtures shared by the reliability tests: the workflow through a cluster executor, with failing jobs."""

from __future__ import annotations

import pytest

from reliability.cluster_helpers import FAILING, FLAKY, SHARDS, ClusterRun, plan_failures, slurm_profile, snapshot
from workflow_helpers import REPO, snakemake, workflow_copy


@pytest.fixture(scope="session")
def cluster_run(tmp_path_factory) -> ClusterRun:
    """Every job through the cluster-generic executor (tests/fake_sbatch.sh), with the SLURM profile's
    retries and keep-going; one job fails on every attempt, one fails once. Then the same command again.

    CPU float results depend on the thread count, so the torch rules get the 2 threads the local run
    gave them (on a cluster: set-threads).
    """
    profile = slurm_profile()
    retries, keep_going = int(profile.get("retries", 0)), bool(profile.get("keep-going", False))
    wf = workflow_copy(tmp_path_factory.mktemp("cluster"), {"shards": SHARDS})
    faults = wf / "faults"
    plan_failures(faults, FAILING, retries + 1)
    plan_failures(faults, FLAKY, retries)
    args = ["--executor", "cluster-generic", "--jobs", "4",
            "--cluster-generic-submit-cmd", str(REPO / "tests" / "fake_sbatch.sh"),
            "--set-threads", "train_ddpm=2", "train_baseline=2", "--seconds-between-status-checks", "1",
            "--retries", str(retries), *(["--keep-going"] if keep_going else [])]
    env = {"FAKE_SBATCH_FAULTS": str(faults)}
    first = snakemake(wf, *args, env=env)
    before = snapshot(wf)
    rerun = snakemake(wf, *args, env=env)
    return ClusterRun(wf, retries, first, before, rerun)
