from pathlib import Path

from diffseg.bundle import load_bundle
from diffseg.logs import log_to

with log_to(snakemake.log[0]):
    load_bundle(snakemake.input[0], Path(snakemake.output.manifest).parent, snakemake.params.config)
