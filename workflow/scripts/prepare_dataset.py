from diffseg.data import prepare_dataset
from diffseg.logs import log_to

with log_to(snakemake.log[0]):
    prepare_dataset(
        snakemake.input.data,
        snakemake.output.h5,
        snakemake.output.split_csv,
        snakemake.output.preview,
        threads=snakemake.threads,
        **snakemake.params.cfg,
    )
