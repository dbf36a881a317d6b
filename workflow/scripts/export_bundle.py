from diffseg.bundle import export_bundle
from diffseg.logs import log_to

with log_to(snakemake.log[0]):
    export_bundle(
        snakemake.input.checkpoint,
        snakemake.input.calibration,
        snakemake.output[0],
        config=snakemake.params.config,
        optional=snakemake.params.optional,
        training_data=snakemake.params.training_data,
    )
