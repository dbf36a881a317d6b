# DiffSeg: weakly supervised skin-lesion segmentation from diffusion noise differences.
# Run:  snakemake --cores 8 --resources gpu=1            (demo data, config/config.yaml)
#       snakemake --cores 8 --resources gpu=1 --configfile config/isic2018.yaml
#       snakemake --cores 8 --configfile config/isic2018.yaml config/predict.yaml   (new images, no masks)
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/train.smk"
include: "rules/features.smk"
include: "rules/infer.smk"
include: "rules/uncertainty.smk"
include: "rules/crf.smk"
include: "rules/evaluate.smk"
include: "rules/predict.smk"


rule all:
    input:
        final_targets(),
    default_target: True
