rule crf_fusion:
    input:
        h5=split_dataset,
        inference=shard_file("inference", "{split}", "{shard}"),
        calibration=split_calibration,
    output:
        shard_file("crf", "{split}", "{shard}"),
    params:
        cfg=config["crf"],
        paper_rows=lambda wildcards: wildcards.split != PREDICT,  # the table's faithful rows; no table here
    log:
        f"{R}/logs/crf_fusion/{{split}}_shard-{{shard}}.log",
    benchmark:
        f"{R}/benchmarks/crf_fusion/{{split}}_shard-{{shard}}.tsv"
    threads: 8
    resources:
        mem_mb=4000,
        runtime=120,
    conda:
        ENV
    script:
        "../workflow/scripts/crf_fusion.py"


rule gather_crf:
    input:
        all_shards("crf"),
    output:
        f"{R}/crf/{{split}}.h5",
    log:
        f"{R}/logs/gather_crf/{{split}}.log",
    benchmark:
        f"{R}/benchmarks/gather_crf/{{split}}.tsv"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=30,
    conda:
        ENV
    script:
        "../workflow/scripts/gather_shards.py"


rule export_masks:
    input:
        h5=f"{R}/data/dataset.h5",
        crf=f"{R}/crf/{{split}}.h5",
    output:
        directory(f"{R}/crf/{{split}}_png"),
    log:
        f"{R}/logs/export_masks/{{split}}.log",
    benchmark:
        f"{R}/benchmarks/export_masks/{{split}}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        ENV
    script:
        "../workflow/scripts/export_masks.py"
