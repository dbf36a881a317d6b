from diffseg.logs import log_to
from diffseg.predict import score_predictions

with log_to(snakemake.log[0]):
    score_predictions(
        snakemake.input.h5,
        snakemake.input.images,
        snakemake.input.truth,
        snakemake.input.masks,
        snakemake.input.queue,
        snakemake.output.per_image,
        snakemake.output.table,
        fail_dice=snakemake.params.fail_dice,
    )
