from diffseg.data import prepare_dataset
from diffseg.logs import log_to
from diffseg.settings import PrepareSettings

with log_to(snakemake.log[0]):
    prepare_dataset(
        snakemake.input.data,
        snakemake.output.h5,
        snakemake.output.split_csv,
        snakemake.output.preview,
        PrepareSettings.from_config(snakemake.params.cfg),
        threads=snakemake.threads,
    )
