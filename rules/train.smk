rule train_ddpm:
    input:
        h5=f"{R}/data/dataset.h5",
    output:
        checkpoint=f"{R}/models/ddpm.pt",
        log_csv=f"{R}/models/ddpm_train_log.csv",
        loss_png=report(f"{R}/models/ddpm_loss.png", category="Training", caption="../report/loss.rst"),
    params:
        model=config["model"],
        diffusion=config["diffusion"],
        augment=config["augment"],
        train=config["train"],
    log:
        f"{R}/logs/train_ddpm.log",
    benchmark:
        f"{R}/benchmarks/train_ddpm.tsv"
    threads: 4
    resources:
        **GPU_RESOURCES["train_ddpm"],
    conda:
        ENV
    script:
        "../workflow/scripts/train_ddpm.py"


rule train_baseline:
    input:
        h5=f"{R}/data/dataset.h5",
    output:
        checkpoint=f"{R}/models/baseline_{{baseline}}.pt",
        log_csv=f"{R}/models/baseline_{{baseline}}_train_log.csv",
    params:
        cfg=without("baselines", "methods"),
        augment=config["augment"],
    log:
        f"{R}/logs/train_baseline/{{baseline}}.log",
    benchmark:
        f"{R}/benchmarks/train_baseline/{{baseline}}.tsv"
    threads: 4
    resources:
        **GPU_RESOURCES["train_baseline"],
    conda:
        ENV
    script:
        "../workflow/scripts/train_baseline.py"


rule predict_baseline:
    input:
        h5=f"{R}/data/dataset.h5",
        checkpoint=baseline_checkpoint,
    output:
        f"{R}/baselines/{{baseline}}/{{split}}.h5",
    params:
        cfg=without("baselines", "methods"),
    log:
        f"{R}/logs/predict_baseline/{{baseline}}_{{split}}.log",
    benchmark:
        f"{R}/benchmarks/predict_baseline/{{baseline}}_{{split}}.tsv"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
    conda:
        ENV
    script:
        "../workflow/scripts/predict_baseline.py"
