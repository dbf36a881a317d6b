"""Air-gapped install: build a wheelhouse once, then install with no package index at all."""

import os
import subprocess
import sys

import pytest

from workflow_helpers import REPO


@pytest.mark.slow
def test_wheelhouse_installs_with_index_disabled_and_keeps_torch(tmp_path):
    wheelhouse = tmp_path / "wheelhouse"
    build = subprocess.run([str(REPO / "tools/wheelhouse.sh"), "build", str(wheelhouse)],
                           env={**os.environ, "PYTHON": sys.executable, "WITH_TORCH": "1"},
                           capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stderr[-3000:]
    assert any(p.name.startswith("diffseg-") for p in wheelhouse.iterdir())

    venv = tmp_path / "site-env"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    # No index, no pip config (it may name local wheel folders): only the wheelhouse.
    offline = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PYTHON": py}
    torch_wheel = next(wheelhouse.glob("torch-*.whl"))
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheelhouse), str(torch_wheel)], env=offline, check=True)
    # Stands in for the site's own torch build: the install must not touch it.
    (venv / "torch-marker").write_text(subprocess.check_output(
        [py, "-c", "import torch, os; print(torch.__version__, os.path.getmtime(torch.__file__))"], text=True))

    install = subprocess.run([str(REPO / "tools/wheelhouse.sh"), "install", str(wheelhouse)],
                             env=offline, capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-3000:]
    after = subprocess.check_output(
        [py, "-c", "import torch, os; print(torch.__version__, os.path.getmtime(torch.__file__))"], text=True)
    assert after == (venv / "torch-marker").read_text()
    check = subprocess.run([py, "-c", "import diffseg, pydensecrf.densecrf, snakemake, h5py, skimage, isic_challenge_scoring; print('ok')"],
                           env=offline, capture_output=True, text=True)
    assert check.stdout.strip() == "ok", check.stderr
