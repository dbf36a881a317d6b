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
