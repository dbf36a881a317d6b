from diffseg.inference import InferenceSettings, run_inference
from diffseg.logs import log_to

with log_to(snakemake.log[0]):
    run_inference(
        snakemake.input.h5,
        snakemake.input.checkpoint,
        snakemake.output[0],
        InferenceSettings.from_config(snakemake.params.cfg),
        split=snakemake.wildcards.split,
        shard=int(snakemake.wildcards.shard),
        n_shards=snakemake.params.n_shards,
        head_checkpoint=snakemake.input.head or None,
    )
