import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
ISIC_256 = SHARED_DATA / "isic2018_task1_256"
ISIC_FULLRES = SHARED_DATA / "isic2018_task1_fullres"


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tests share a 2-core machine: keep torch to one thread so timings stay predictable."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def needs_isic_256():
    return pytest.mark.skipif(not ISIC_256.is_dir(), reason=f"shared ISIC data not found at {ISIC_256}")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The whole workflow once, for real, on tiny demo data (shared by the workflow tests)."""
    from workflow_helpers import snakemake, workflow_copy

    wf = workflow_copy(tmp_path_factory.mktemp("tiny_run"))
    run = snakemake(wf)
    assert run.returncode == 0, run.stderr[-5000:]
    return wf
