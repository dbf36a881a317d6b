rule fit_risk:
    input:
        h5=f"{R}/data/dataset.h5",
        inference=f"{R}/inference/val.h5",
        crf=f"{R}/crf/val.h5",
        calibration=CALIBRATION,
    output:
        RISK_MODEL,
    params:
        cfg=config["risk"],
        fail_dice=config["evaluate"]["fail_dice"],
    log:
        f"{R}/logs/fit_risk.log",
    benchmark:
        f"{R}/benchmarks/fit_risk.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        ENV
    script:
        "../workflow/scripts/fit_risk.py"


rule evaluate:
    input:
        h5=f"{R}/data/dataset.h5",
        inference=expand(f"{R}/inference/{{split}}.h5", split=["val", EVAL_SPLIT]),
        uncertainty=f"{R}/uncertainty/{EVAL_SPLIT}.h5",
        crf=f"{R}/crf/{EVAL_SPLIT}.h5",
        calibration=CALIBRATION,
        risk=RISK_MODEL,
        baselines=expand(f"{R}/baselines/{{baseline}}/{EVAL_SPLIT}.h5", baseline=BASELINES),
        truth=data_dir(),  # the original-size ground truth, for the official ISIC score
    output:
        per_image=f"{R}/metrics/{EVAL_SPLIT}.csv",
        table=report(f"{R}/metrics/table.md", category="Metrics", caption="../report/table.rst"),
        png=directory(f"{R}/metrics/{EVAL_SPLIT}_png"),
        review_queue=f"{R}/metrics/review_queue.csv",
        reliability=f"{R}/metrics/reliability.csv",
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


rule risk_figures:
    input:
        review_queue=f"{R}/metrics/review_queue.csv",
        reliability=f"{R}/metrics/reliability.csv",
    output:
        risk_coverage=report(f"{R}/figures/risk_coverage.png", category="Figures",
                             caption="../report/risk_coverage.rst"),
        reliability=report(f"{R}/figures/reliability.png", category="Figures", caption="../report/reliability.rst"),
    params:
        dpi=config["figures"]["dpi"],
        fail_dice=config["evaluate"]["fail_dice"],
    log:
        f"{R}/logs/risk_figures.log",
    benchmark:
        f"{R}/benchmarks/risk_figures.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        ENV
    script:
        "../workflow/scripts/risk_figures.py"
