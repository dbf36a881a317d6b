from diffseg.demo import make_demo_dataset
from diffseg.logs import log_to

with log_to(snakemake.log[0]):
    make_demo_dataset(snakemake.output[0], **snakemake.params.cfg)
