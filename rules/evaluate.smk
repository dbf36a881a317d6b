rule evaluate:
    input:
        h5=f"{R}/data/dataset.h5",
        inference=expand(f"{R}/inference/{{split}}.h5", split=["val", EVAL_SPLIT]),
        uncertainty=f"{R}/uncertainty/{EVAL_SPLIT}.h5",
        crf=f"{R}/crf/{EVAL_SPLIT}.h5",
        calibration=CALIBRATION,
        baselines=expand(f"{R}/baselines/{{baseline}}/{EVAL_SPLIT}.h5", baseline=BASELINES),
        truth=data_dir(),  # the original-size ground truth, for the official ISIC score
    output:
        per_image=f"{R}/metrics/{EVAL_SPLIT}.csv",
        table=report(f"{R}/metrics/table.md", category="Metrics", caption="../report/table.rst"),
        png=directory(f"{R}/metrics/{EVAL_SPLIT}_png"),
    params:
        cfg=config["evaluate"],
        baselines=BASELINES,
    log:
        f"{R}/logs/evaluate.log",
    benchmark:
        f"{R}/benchmarks/evaluate.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        ENV
    script:
        "../workflow/scripts/evaluate.py"


rule figures:
    input:
        h5=f"{R}/data/dataset.h5",
        checkpoint=f"{R}/models/ddpm.pt",
        inference=f"{R}/inference/{EVAL_SPLIT}.h5",
        uncertainty=f"{R}/uncertainty/{EVAL_SPLIT}.h5",
        crf=f"{R}/crf/{EVAL_SPLIT}.h5",
        per_image=f"{R}/metrics/{EVAL_SPLIT}.csv",
        calibration=CALIBRATION,
    output:
        summary=report(f"{R}/figures/summary.png", category="Figures", caption="../report/summary.rst"),
        cases=report(
            directory(f"{R}/figures/cases"),
            patterns=["{name}.png"],
            category="Figures",
            caption="../report/cases.rst",
        ),
        method=report(
            directory(f"{R}/figures/method"),
            patterns=["{name}.png"],
            category="Figures",
            caption="../report/method.rst",
        ),
    params:
        cfg=config["figures"],
        note=DATA_NOTE,
        inference=without("inference", "splits"),
        split=EVAL_SPLIT,
    log:
        f"{R}/logs/figures.log",
    benchmark:
        f"{R}/benchmarks/figures.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        ENV
    script:
        "../workflow/scripts/figures.py"
