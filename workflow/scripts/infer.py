from diffseg.features import run_feature_inference
from diffseg.inference import InferenceSettings, run_inference
from diffseg.logs import log_to

with log_to(snakemake.log[0]):
    settings = InferenceSettings.from_config(snakemake.params.cfg)
    where = dict(split=snakemake.wildcards.split, shard=int(snakemake.wildcards.shard),
                 n_shards=snakemake.params.n_shards)
    if settings.method == "features":
        run_feature_inference(snakemake.input.h5, snakemake.input.checkpoint, snakemake.input.head,
                              snakemake.output[0], settings, **where)
    else:
        run_inference(snakemake.input.h5, snakemake.input.checkpoint, snakemake.output[0], settings, **where)
