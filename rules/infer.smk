rule infer:
    input:
        unpack(method_artefacts),
        h5=split_dataset,
        checkpoint=split_checkpoint,
        manifest=split_manifest,
    output:
        shard_file("inference", "{split}", "{shard}"),
    params:
        cfg=without("inference", "splits"),
        n_shards=SHARDS,
    log:
        f"{R}/logs/infer/{{split}}_shard-{{shard}}.log",
    benchmark:
        f"{R}/benchmarks/infer/{{split}}_shard-{{shard}}.tsv"
    threads: 2
    resources:
        **GPU_RESOURCES["infer"],
    conda:
        ENV
    script:
        "../workflow/scripts/infer.py"


rule gather_inference:
    input:
        all_shards("inference"),
    output:
        f"{R}/inference/{{split}}.h5",
    log:
        f"{R}/logs/gather_inference/{{split}}.log",
    benchmark:
        f"{R}/benchmarks/gather_inference/{{split}}.tsv"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=30,
    conda:
        ENV
    script:
        "../workflow/scripts/gather_shards.py"


rule calibrate:
    input:
        h5=f"{R}/data/dataset.h5",
        val=f"{R}/inference/val.h5",
    output:
        CALIBRATION,
    params:
        cfg=config["calibration"],
        threshold=config["inference"]["threshold"],
    log:
        f"{R}/logs/calibrate.log",
    benchmark:
        f"{R}/benchmarks/calibrate.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        ENV
    script:
        "../workflow/scripts/calibrate.py"
