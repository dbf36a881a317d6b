from diffseg.inference import InferenceSettings, run_inference
from diffseg.logs import log_to
from diffseg.methods import inference_method

with log_to(snakemake.log[0]):
    settings = InferenceSettings.from_config(snakemake.params.cfg)
    artefacts = {a.name: getattr(snakemake.input, a.name) for a in inference_method(settings.method).artefacts}
    run_inference(snakemake.input.h5, snakemake.input.checkpoint, snakemake.output[0], settings,
                  split=snakemake.wildcards.split, shard=int(snakemake.wildcards.shard),
                  n_shards=snakemake.params.n_shards, artefacts=artefacts)
