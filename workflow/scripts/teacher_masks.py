from diffseg.features import run_teacher_masks
from diffseg.logs import log_to

with log_to(snakemake.log[0]):
    run_teacher_masks(
        snakemake.input.h5,
        snakemake.input.checkpoint,
        snakemake.output[0],
        calibration=snakemake.params.calibration,
        **snakemake.params.teacher,
        **snakemake.params.inference,
    )
