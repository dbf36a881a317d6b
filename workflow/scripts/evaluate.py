from diffseg.evaluate import EvaluateInputs, EvaluateOutputs, run_evaluate
from diffseg.logs import log_to

with log_to(snakemake.log[0]):
    run_evaluate(
        EvaluateInputs(
            dataset_h5=snakemake.input.h5,
            inference_h5s=snakemake.input.inference,
            uncertainty_h5=snakemake.input.uncertainty,
            crf_h5=snakemake.input.crf,
            truth_dir=snakemake.input.truth,
            baselines=dict(zip(snakemake.params.baselines, snakemake.input.baselines)),
            calibration_h5=snakemake.input.calibration,
            risk_json=snakemake.input.risk,
        ),
        EvaluateOutputs(
            per_image_csv=snakemake.output.per_image,
            table_md=snakemake.output.table,
            png_dir=snakemake.output.png,
            review_queue_csv=snakemake.output.review_queue,
            reliability_csv=snakemake.output.reliability,
        ),
        **snakemake.params.cfg,
    )
