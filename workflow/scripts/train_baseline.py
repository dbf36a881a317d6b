from diffseg.baselines import train_baseline
from diffseg.logs import log_to
from diffseg.settings import BaselineSettings

with log_to(snakemake.log[0]):
    train_baseline(
        snakemake.wildcards.baseline,
        snakemake.input.h5,
        snakemake.output.checkpoint,
        snakemake.output.log_csv,
        BaselineSettings.from_config(snakemake.params.cfg),
        augment=snakemake.params.augment,
    )
