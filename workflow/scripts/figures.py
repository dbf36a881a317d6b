from diffseg.figures import run_figures
from diffseg.logs import log_to

with log_to(snakemake.log[0]):
    run_figures(
        snakemake.input.h5,
        snakemake.input.checkpoint,
        snakemake.input.inference,
        snakemake.input.uncertainty,
        snakemake.input.crf,
        snakemake.input.per_image,
        snakemake.output.summary,
        snakemake.output.cases,
        snakemake.output.method,
        split=snakemake.params.split,
        inference=snakemake.params.inference,
        calibration_h5=snakemake.input.calibration,
        note=snakemake.params.note,
        **snakemake.params.cfg,
    )
