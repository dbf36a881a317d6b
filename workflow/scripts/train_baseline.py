from diffseg.baselines import train_baseline
from diffseg.logs import log_to

with log_to(snakemake.log[0]):
    train_baseline(
        snakemake.wildcards.baseline,
        snakemake.input.h5,
        snakemake.output.checkpoint,
        snakemake.output.log_csv,
        augment=snakemake.params.augment,
        **snakemake.params.cfg,
    )
