from diffseg.features import train_feature_head
from diffseg.logs import log_to
from diffseg.settings import HeadSettings, InferenceSettings

with log_to(snakemake.log[0]):
    train_feature_head(
        snakemake.input.h5,
        snakemake.input.checkpoint,
        snakemake.output.checkpoint,
        snakemake.output.log_csv,
        HeadSettings.from_config(snakemake.params.cfg),
        InferenceSettings.from_config(snakemake.params.inference),  # the inputs' timesteps, noise seed, device
        targets_h5=snakemake.input.targets or None,
    )
