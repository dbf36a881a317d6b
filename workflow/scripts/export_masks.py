from diffseg.export import export_masks
from diffseg.logs import log_to

with log_to(snakemake.log[0]):
    export_masks(snakemake.input.h5, snakemake.input.crf, snakemake.output[0], split=snakemake.wildcards.split)
