# The trained model as one portable file, and prediction on new images without masks.
# Prediction runs the per-image stages (infer, uncertainty, crf_fusion and their gathers)
# with split "predict": images from rule prepare_images, checkpoint and calibration from the bundle.
# With predict.masks (masks of those images), rule score_predictions scores the final masks.


rule export_bundle:
    input:
        checkpoint=f"{R}/models/ddpm.pt",
        calibration=CALIBRATION,
        optional=lambda wildcards: list(BUNDLE_OPTIONAL.values()),
    output:
        BUNDLE,
    params:
        config=BUNDLE_CONFIG,
        optional=lambda wildcards: BUNDLE_OPTIONAL,
        training_data=config["data_dir"] or "synthetic demo data",
    log:
        f"{R}/logs/export_bundle.log",
    benchmark:
        f"{R}/benchmarks/export_bundle.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        ENV
    script:
        "../workflow/scripts/export_bundle.py"


rule unpack_bundle:
    input:
        PREDICT_BUNDLE,
    output:
        **PREDICT_MODEL,
    params:
        config=BUNDLE_CONFIG,
    log:
        f"{R}/logs/unpack_bundle.log",
    benchmark:
        f"{R}/benchmarks/unpack_bundle.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        ENV
    script:
        "../workflow/scripts/unpack_bundle.py"


rule prepare_images:
    input:
        images=config["predict"]["images"] or [],
    output:
        PREDICT_IMAGES,
    params:
        resolution=config["prepare"]["resolution"],
        on_bad_file=config["prepare"]["on_bad_file"],
    log:
        f"{R}/logs/prepare_images.log",
    benchmark:
        f"{R}/benchmarks/prepare_images.tsv"
    threads: 8
    resources:
        mem_mb=8000,
        runtime=60,
    conda:
        ENV
    script:
        "../workflow/scripts/prepare_images.py"


rule predict_outputs:
    input:
        images=config["predict"]["images"] or [],
        h5=PREDICT_IMAGES,
        uncertainty=f"{R}/uncertainty/{PREDICT}.h5",
        crf=f"{R}/crf/{PREDICT}.h5",
        inference=f"{R}/inference/{PREDICT}.h5",
        calibration=PREDICT_MODEL["calibration"],
        manifest=PREDICT_MODEL["manifest"],
        bundle=PREDICT_BUNDLE,
    output:
        masks=directory(f"{P}/masks"),
        maps=directory(f"{P}/maps"),
        queue=f"{P}/review_queue.csv",
        sheet=report(f"{P}/contact_sheet.png", category="Prediction", caption="../report/contact_sheet.rst"),
    params:
        cfg={k: v for k, v in config["predict"].items() if k not in ("images", "bundle", "masks")},
        dpi=config["figures"]["dpi"],
    log:
        f"{R}/logs/predict_outputs.log",
    benchmark:
        f"{R}/benchmarks/predict_outputs.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        ENV
    script:
        "../workflow/scripts/predict_outputs.py"


rule score_predictions:
    input:
        images=config["predict"]["images"] or [],
        truth=config["predict"]["masks"] or [],
        h5=PREDICT_IMAGES,
        masks=f"{P}/masks",
        queue=f"{P}/review_queue.csv",
    output:
        per_image=f"{P}/metrics.csv",
        table=f"{P}/table.md",
    params:
        fail_dice=config["evaluate"]["fail_dice"],
    log:
        f"{R}/logs/score_predictions.log",
    benchmark:
        f"{R}/benchmarks/score_predictions.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        ENV
    script:
        "../workflow/scripts/score_predictions.py"
