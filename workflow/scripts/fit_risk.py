from diffseg.logs import log_to
from diffseg.risk import run_fit_risk

with log_to(snakemake.log[0]):
    run_fit_risk(
        snakemake.input.h5,
        snakemake.input.inference,
        snakemake.input.crf,
        snakemake.input.calibration,
        snakemake.output[0],
        fail_dice=snakemake.params.fail_dice,
        **snakemake.params.cfg,
    )
