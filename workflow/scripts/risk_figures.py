from diffseg.figures_risk import run_risk_figures
from diffseg.logs import log_to

with log_to(snakemake.log[0]):
    run_risk_figures(
        snakemake.input.review_queue,
        snakemake.input.reliability,
        snakemake.output.risk_coverage,
        snakemake.output.reliability,
        fail_dice=snakemake.params.fail_dice,
        dpi=snakemake.params.dpi,
    )
