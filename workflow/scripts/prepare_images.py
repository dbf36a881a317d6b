from diffseg.data import prepare_images
from diffseg.logs import log_to

with log_to(snakemake.log[0]):
    prepare_images(
        snakemake.input.images,
        snakemake.output[0],
        resolution=snakemake.params.resolution,
        on_bad_file=snakemake.params.on_bad_file,
        threads=snakemake.threads,
    )
