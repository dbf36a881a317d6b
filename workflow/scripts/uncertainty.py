from diffseg.logs import log_to
from diffseg.uncertainty import run_uncertainty

with log_to(snakemake.log[0]):
    run_uncertainty(snakemake.input[0], snakemake.output.h5, snakemake.output.csv)
