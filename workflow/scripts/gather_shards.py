from diffseg.logs import log_to
from diffseg.shards import gather

with log_to(snakemake.log[0]):
    gather(snakemake.input, snakemake.output)
