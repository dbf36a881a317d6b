rule teacher_masks:
    input:
        h5=f"{R}/data/dataset.h5",
        checkpoint=f"{R}/models/ddpm.pt",
    output:
        TEACHER_MASKS,
    params:
        teacher=config["features"]["teacher"],
        calibration={**config["calibration"], "threshold": config["inference"]["threshold"]},
        inference={k: config["inference"][k] for k in ("seed", "batch_images", "device", "precision")},
    log:
        f"{R}/logs/teacher_masks.log",
    benchmark:
        f"{R}/benchmarks/teacher_masks.tsv"
    threads: 2
    resources:
        **GPU_RESOURCES["teacher_masks"],
    conda:
        ENV
    script:
        "../workflow/scripts/teacher_masks.py"


rule train_feature_head:
    input:
        h5=f"{R}/data/dataset.h5",
        checkpoint=f"{R}/models/ddpm.pt",
        targets=head_targets,
    output:
        checkpoint=FEATURE_HEAD,
        log_csv=f"{R}/models/feature_head_train_log.csv",
    params:
        cfg=without("features", "targets", "teacher"),
        inference={k: config["inference"][k] for k in ("timesteps", "seed", "batch_images", "device", "precision")},
    log:
        f"{R}/logs/train_feature_head.log",
    benchmark:
        f"{R}/benchmarks/train_feature_head.tsv"
    threads: 2
    resources:
        **GPU_RESOURCES["train_feature_head"],
    conda:
        ENV
    script:
        "../workflow/scripts/train_feature_head.py"
