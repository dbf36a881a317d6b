from diffseg.calibration import run_calibrate
from diffseg.logs import log_to

with log_to(snakemake.log[0]):
    run_calibrate(
        snakemake.input.h5,
        snakemake.input.val,
        snakemake.output[0],
        threshold=snakemake.params.threshold,
        **snakemake.params.cfg,
    )
