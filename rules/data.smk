rule make_demo_data:
    output:
        directory(f"{R}/demo_data"),
    params:
        cfg=config["demo"],
    log:
        f"{R}/logs/make_demo_data.log",
    benchmark:
        f"{R}/benchmarks/make_demo_data.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        ENV
    script:
        "../workflow/scripts/make_demo_data.py"


rule prepare_dataset:
    input:
        data=data_dir(),
    output:
        h5=f"{R}/data/dataset.h5",
        split_csv=f"{R}/data/split.csv",
        preview=report(f"{R}/data/preview.png", category="Data", caption="../report/preview.rst"),
    params:
        cfg=config["prepare"],
    log:
        f"{R}/logs/prepare_dataset.log",
    benchmark:
        f"{R}/benchmarks/prepare_dataset.tsv"
    threads: 8
    resources:
        mem_mb=8000,
        runtime=60,
    conda:
        ENV
    script:
        "../workflow/scripts/prepare_dataset.py"
