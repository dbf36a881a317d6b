from diffseg.logs import log_to
from diffseg.predict import write_predictions

with log_to(snakemake.log[0]):
    write_predictions(
        snakemake.input.h5,
        snakemake.input.uncertainty,
        snakemake.input.crf,
        snakemake.input.images,
        snakemake.output.masks,
        snakemake.output.maps,
        snakemake.output.queue,
        snakemake.output.sheet,
        manifest_json=snakemake.input.manifest,
        risk_inputs=(snakemake.input.bundle, snakemake.input.inference, snakemake.input.calibration),
        dpi=snakemake.params.dpi,
        **snakemake.params.cfg,
    )
