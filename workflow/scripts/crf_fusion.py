from diffseg.crf import run_crf
from diffseg.logs import log_to
from diffseg.settings import CRFSettings

with log_to(snakemake.log[0]):
    run_crf(
        snakemake.input.h5,
        snakemake.input.inference,
        snakemake.output[0],
        CRFSettings.from_config(snakemake.params.cfg),
        split=snakemake.wildcards.split,
        threads=snakemake.threads,
        calibration_h5=snakemake.input.calibration,
        paper_rows=snakemake.params.paper_rows,
    )
