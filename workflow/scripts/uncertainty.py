from diffseg.logs import log_to
from diffseg.uncertainty import run_uncertainty

with log_to(snakemake.log[0]):
    run_uncertainty(snakemake.input.inference, snakemake.output.h5, snakemake.output.csv,
                    calibration_h5=snakemake.input.calibration)
