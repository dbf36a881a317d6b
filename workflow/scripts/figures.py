from diffseg.figures import FigureInputs, FigureOutputs, run_figures
from diffseg.logs import log_to

with log_to(snakemake.log[0]):
    run_figures(
        FigureInputs(
            dataset_h5=snakemake.input.h5,
            checkpoint=snakemake.input.checkpoint,
            inference_h5=snakemake.input.inference,
            uncertainty_h5=snakemake.input.uncertainty,
            crf_h5=snakemake.input.crf,
            per_image_csv=snakemake.input.per_image,
            calibration_h5=snakemake.input.calibration,
        ),
        FigureOutputs(
            summary_png=snakemake.output.summary,
            cases_dir=snakemake.output.cases,
            method_dir=snakemake.output.method,
        ),
        split=snakemake.params.split,
        inference=snakemake.params.inference,
        note=snakemake.params.note,
        **snakemake.params.cfg,
    )
