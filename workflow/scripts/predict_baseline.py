from diffseg.baselines import predict_baseline
from diffseg.logs import log_to
from diffseg.settings import BaselineSettings

with log_to(snakemake.log[0]):
    predict_baseline(
        snakemake.wildcards.baseline,
        snakemake.input.h5,
        snakemake.input.checkpoint or None,
        snakemake.output[0],
        BaselineSettings.from_config(snakemake.params.cfg),
        split=snakemake.wildcards.split,
    )
