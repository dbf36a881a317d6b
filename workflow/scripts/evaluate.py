from diffseg.evaluate import run_evaluate
from diffseg.logs import log_to

with log_to(snakemake.log[0]):
    run_evaluate(
        snakemake.input.h5,
        snakemake.input.inference,
        snakemake.input.uncertainty,
        snakemake.input.crf,
        dict(zip(snakemake.params.baselines, snakemake.input.baselines)),
        snakemake.output.per_image,
        snakemake.output.table,
        truth_dir=snakemake.input.truth,
        png_dir=snakemake.output.png,
        calibration_h5=snakemake.input.calibration,
        risk_json=snakemake.input.risk,
        review_queue_csv=snakemake.output.review_queue,
        reliability_csv=snakemake.output.reliability,
        **snakemake.params.cfg,
    )
