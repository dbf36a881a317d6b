from diffseg.crf import run_crf
from diffseg.logs import log_to

with log_to(snakemake.log[0]):
    run_crf(
        snakemake.input.h5,
        snakemake.input.inference,
        snakemake.output[0],
        None,
        split=snakemake.wildcards.split,
        threads=snakemake.threads,
        calibration_h5=snakemake.input.calibration,
        **snakemake.params.cfg,
    )
