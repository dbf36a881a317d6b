from diffseg.logs import log_to
from diffseg.predict import PredictionFiles, write_predictions

with log_to(snakemake.log[0]):
    write_predictions(
        PredictionFiles(
            images_h5=snakemake.input.h5,
            uncertainty_h5=snakemake.input.uncertainty,
            crf_h5=snakemake.input.crf,
            image_dir=snakemake.input.images,
            masks_dir=snakemake.output.masks,
            maps_dir=snakemake.output.maps,
            queue_csv=snakemake.output.queue,
            sheet_png=snakemake.output.sheet,
        ),
        manifest_json=snakemake.input.manifest,
        risk_inputs=(snakemake.input.bundle, snakemake.input.inference, snakemake.input.calibration),
        dpi=snakemake.params.dpi,
        **snakemake.params.cfg,
    )
