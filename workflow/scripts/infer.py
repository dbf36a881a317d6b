from diffseg.bundle import check_runtime
from diffseg.inference import run_inference
from diffseg.logs import log_to
from diffseg.methods import inference_method
from diffseg.runtime import resolved_runtime
from diffseg.settings import InferenceSettings

with log_to(snakemake.log[0]):
    settings = InferenceSettings.from_config(snakemake.params.cfg)
    if snakemake.input.manifest:  # prediction: resolve to the precision and device type of the bundle's calibration
        check_runtime(snakemake.input.manifest, resolved_runtime(settings.device, settings.precision))
    artefacts = {a.name: getattr(snakemake.input, a.name) for a in inference_method(settings.method).artefacts}
    run_inference(snakemake.input.h5, snakemake.input.checkpoint, snakemake.output[0], settings,
                  split=snakemake.wildcards.split, shard=int(snakemake.wildcards.shard),
                  n_shards=snakemake.params.n_shards, artefacts=artefacts)
