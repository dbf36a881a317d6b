rule uncertainty:
    input:
        inference=shard_file("inference", "{split}", "{shard}"),
        calibration=split_calibration,
    output:
        h5=shard_file("uncertainty", "{split}", "{shard}"),
        csv=shard_file("uncertainty", "{split}", "{shard}", ext="csv"),
    log:
        f"{R}/logs/uncertainty/{{split}}_shard-{{shard}}.log",
    benchmark:
        f"{R}/benchmarks/uncertainty/{{split}}_shard-{{shard}}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        ENV
    script:
        "../workflow/scripts/uncertainty.py"


rule gather_uncertainty:
    input:
        h5=all_shards("uncertainty"),
        csv=all_shards("uncertainty", ext="csv"),
    output:
        h5=f"{R}/uncertainty/{{split}}.h5",
        csv=f"{R}/uncertainty/{{split}}.csv",
    log:
        f"{R}/logs/gather_uncertainty/{{split}}.log",
    benchmark:
        f"{R}/benchmarks/gather_uncertainty/{{split}}.tsv"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=30,
    conda:
        ENV
    script:
        "../workflow/scripts/gather_shards.py"
