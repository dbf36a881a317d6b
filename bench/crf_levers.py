"""CRF kernel settings chosen on the VAL split only (the test split is never read).

For a finished quick-benchmark run (its data/dataset.h5, inference/val.h5 and calibration/calibration.h5),
runs the workflow's CRF fusion (diffseg.crf.run_crf, the calibrated lesion probabilities as unaries)
on the val split once per candidate setting and prints the val Dice of the fused masks beside the
val Dice of the calibrated vote of the outputs (no CRF), one JSON line per setting:

    PYTHONPATH=src .venv/bin/python bench/crf_levers.py /work/runs/m/seed0_features
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np

from diffseg.calibration import load_calibration
from diffseg.crf import run_crf
from diffseg.settings import CRFSettings
from diffseg.data import load_split
from diffseg.h5io import decode_ids, match_rows
from diffseg.metrics import dice
from diffseg.postprocess import apply_calibration, vote

CANDIDATES = {  # name -> changes to the run's crf section
    "run's settings": {},
    "bilateral compat 5": {"bilateral_compat": 5},
    "bilateral compat 3": {"bilateral_compat": 3},
    "bilateral sxy 5": {"bilateral_sxy": 5},
    "bilateral sxy 5, compat 5": {"bilateral_sxy": 5, "bilateral_compat": 5},
    "bilateral sxy 5, compat 3": {"bilateral_sxy": 5, "bilateral_compat": 3},
    "bilateral sxy 3, compat 5": {"bilateral_sxy": 3, "bilateral_compat": 5},
    "bilateral sxy 10, compat 5": {"bilateral_sxy": 10, "bilateral_compat": 5},
    "no bilateral kernel": {"bilateral_compat": 0},
    "1 iteration": {"iterations": 1},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="finished results folder")
    args = parser.parse_args()
    dataset, inference = args.run / "data/dataset.h5", args.run / "inference/val.h5"
    calibration = args.run / "calibration/calibration.h5"
    val = load_split(dataset, "val")
    with h5py.File(args.run / "crf/test.h5") as f:  # the run's own CRF settings (test file: attributes only)
        base = CRFSettings(**{k: type(getattr(CRFSettings(), k))(f.attrs[k]) for k in CRFSettings.__dataclass_fields__})
    cal = load_calibration(calibration)
    with h5py.File(inference) as f:
        maps, ids = f["maps"][()].astype(np.float32), decode_ids(f["ids"])
    masks = val["masks"][match_rows(ids, val["ids"], inference)].astype(bool)
    votes = np.stack([vote(apply_calibration(m, cal)[1]) for m in maps])
    no_crf = float(np.mean([dice(v, m) for v, m in zip(votes, masks)]))
    with tempfile.TemporaryDirectory() as tmp:
        for name, changes in CANDIDATES.items():
            settings = replace(base, **changes)
            out = Path(tmp) / "crf.h5"
            run_crf(dataset, inference, out, settings, split="val", calibration_h5=calibration, paper_rows=False)
            with h5py.File(out) as f:
                fused = f["fused"][()].astype(bool)
            score = float(np.mean([dice(p, m) for p, m in zip(fused, masks)]))
            print(json.dumps({"crf": name, "val_dice_crf": round(score, 4), "val_dice_vote_no_crf": round(no_crf, 4),
                              **changes}), flush=True)


if __name__ == "__main__":
    main()
