from diffseg.features import train_feature_head
from diffseg.logs import log_to

with log_to(snakemake.log[0]):
    settings = dict(snakemake.params.inference)
    train_feature_head(
        snakemake.input.h5,
        snakemake.input.checkpoint,
        snakemake.output.checkpoint,
        snakemake.output.log_csv,
        targets_h5=snakemake.input.targets or None,
        timesteps=settings.pop("timesteps"),
        noise_seed=settings.pop("seed"),
        **settings,
        **snakemake.params.cfg,
    )
