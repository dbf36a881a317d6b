from diffseg.ddpm import train_ddpm
from diffseg.logs import log_to
from diffseg.settings import TrainSettings

with log_to(snakemake.log[0]):
    train_ddpm(
        snakemake.input.h5,
        snakemake.output.checkpoint,
        snakemake.output.log_csv,
        snakemake.output.loss_png,
        model=snakemake.params.model,
        diffusion=snakemake.params.diffusion,
        augment=snakemake.params.augment,
        train=TrainSettings.from_config(snakemake.params.train),
    )
