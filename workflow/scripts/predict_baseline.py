from diffseg.baselines import predict_baseline
from diffseg.logs import log_to

with log_to(snakemake.log[0]):
    predict_baseline(
        snakemake.wildcards.baseline,
        snakemake.input.h5,
        snakemake.input.checkpoint or None,
        snakemake.output[0],
        split=snakemake.wildcards.split,
        **snakemake.params.cfg,
    )
