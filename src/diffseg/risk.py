"""Per-image failure risk: features of the chain's own outputs, an L2 logistic model fitted on val.

A clinician wants to know which masks to check. :func:`risk_features` describes one image by what the
chain produced for it (no ground truth needed): how much its outputs disagree, how the CRF rounds
disagree, how large the final mask is and whether it runs into the image border, how confident the
soft maps are around the threshold, and how well the final mask agrees with the best single output
and with an independent Otsu segmentation of the image. :func:`fit_risk` standardises those features
(leaving out CRF disagreement when the CRF ran a single round: it is then 0 on every image) and fits an
L2-regularised logistic regression for ``Dice < fail_dice`` on the VALIDATION split only;
:func:`apply_risk` turns features into a risk (the model's failure probability) for any image, with or
without a mask. The model is a JSON file beside the calibration (``calibration/risk.json``).

Evaluation helpers (used by ``diffseg.evaluate`` on the evaluation split): AUROC / average precision
of a score for the failures, the risk-coverage curve (mean Dice of the images kept when the riskiest
fraction goes to review), the review queue, and the pixel-level reliability of the consistency map.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from diffseg.atomic import atomic_path
from diffseg.calibration import load_calibration
from diffseg.h5io import check_split_attr, match_rows, open_h5, read_h5, read_labelled, require
from diffseg.imageio import InputError
from diffseg.metrics import auroc, average_precision, dice
from diffseg import review
from diffseg.postprocess import Calibration, apply_calibration, otsu_segment
from diffseg.uncertainty import ambiguity_area, crf_disagreement, ged_paper

logger = logging.getLogger(__name__)

# Every feature risk_features computes; the order is the column order of the model and the queue.
FEATURES = ("ged_paper", "output_dice_spread", "ambiguity_area", "crf_disagreement", "lesion_area",
            "border_fraction", "soft_margin", "best_vs_fused_dice", "otsu_vs_fused_dice")
FEATURE_LABELS = {
    "ged_paper": "GED among the outputs (paper, eqs. 5-7)",
    "output_dice_spread": "1 - mean pairwise Dice of the outputs",
    "ambiguity_area": "ambiguity area (fraction of pixels with 0 < consistency < 1)",
    "crf_disagreement": "CRF disagreement (fraction of pixels where the K rounds differ)",
    "lesion_area": "final mask area (fraction of the image)",
    "border_fraction": "fraction of the image border covered by the final mask",
    "soft_margin": "mean distance of the soft maps from the threshold (inside the outputs' union)",
    "best_vs_fused_dice": "Dice of the best single output vs the final mask",
    "otsu_vs_fused_dice": "Dice of an Otsu segmentation of the image vs the final mask",
}
REVIEW_FRACTIONS = (0.0, 0.1, 0.2, 0.3)  # riskiest fractions sent to review in the risk-coverage table
RELIABILITY_BINS = 10
RISK_FILE_VERSION = 1


# ----------------------------------------------------------------------------- features of one image


def border_fraction(mask: np.ndarray) -> float:
    """Fraction of the image's outermost pixel ring covered by the mask (H, W): a lesion cut by the frame."""
    m = np.asarray(mask, bool)
    ring = np.concatenate([m[0], m[-1], m[1:-1, 0], m[1:-1, -1]])
    return float(ring.mean())


def output_dice_spread(binary: np.ndarray) -> float:
    """1 - mean Dice over all pairs of the T outputs (T, H, W): disagreement independent of lesion size."""
    t = len(binary)
    if t < 2:
        return 0.0
    pairs = [dice(binary[i], binary[j]) for i in range(t) for j in range(i + 1, t)]
    return float(1.0 - np.mean(pairs))


def soft_margin(probabilities: np.ndarray, binary: np.ndarray, centre: float) -> float:
    """Mean |p - centre| of the soft maps (T, H, W) over the pixels any output calls lesion (all pixels if none).

    Small: the maps hover around the threshold where the lesion is, so a small change flips the mask.
    """
    p = np.asarray(probabilities, np.float64)
    union = np.asarray(binary, bool).any(axis=0)
    margin = np.abs(p - centre)
    return float(margin[:, union].mean() if union.any() else margin.mean())


def probability_centre(cal: Calibration) -> float:
    """The probability at the binarization threshold: 0.5 for the calibrated sigmoid, the threshold for the paper."""
    if cal.method == "paper" and isinstance(cal.threshold, (int, float)):
        return float(cal.threshold)
    return 0.5


def risk_features(image: np.ndarray, probabilities: np.ndarray, binary: np.ndarray, fused: np.ndarray,
                  rounds: np.ndarray, *, best_index: int, centre: float = 0.5) -> dict[str, float]:
    """Every feature of FEATURES for one image, from the chain's outputs only (no ground truth).

    ``image`` (H, W, 3) uint8; ``probabilities`` and ``binary`` (T, H, W): the calibrated outputs
    (diffseg.calibration.apply_calibration); ``fused`` (H, W): the final mask; ``rounds`` (K, H, W): the
    CRF rounds; ``best_index``: the output chosen on val (best single timestep); ``centre``: the
    probability at the threshold (:func:`probability_centre`).
    """
    binary = np.asarray(binary, bool)
    fused = np.asarray(fused, bool)
    if binary.ndim != 3 or binary.shape[1:] != fused.shape or np.shape(probabilities) != binary.shape:
        raise ValueError(f"risk_features: outputs {binary.shape}, probabilities {np.shape(probabilities)} and "
                         f"final mask {fused.shape} do not match")
    if not 0 <= best_index < len(binary):
        raise ValueError(f"risk_features: best_index {best_index} outside the {len(binary)} outputs")
    return {
        "ged_paper": ged_paper(binary),
        "output_dice_spread": output_dice_spread(binary),
        "ambiguity_area": float(ambiguity_area(binary.mean(axis=0))),
        "crf_disagreement": float(crf_disagreement(rounds)),
        "lesion_area": float(fused.mean()),
        "border_fraction": border_fraction(fused),
        "soft_margin": soft_margin(probabilities, binary, centre),
        "best_vs_fused_dice": dice(binary[best_index], fused),
        "otsu_vs_fused_dice": dice(otsu_segment(np.asarray(image)), fused),
    }


# ----------------------------------------------------------------------------- features of a split


def best_index(cal: Calibration, timesteps: Sequence[int], path) -> int:
    """Column of the calibration's best timestep among the file's timesteps."""
    timesteps = [int(t) for t in timesteps]
    if cal.best_timestep not in timesteps:
        raise InputError(path, f"best timestep {cal.best_timestep} (chosen on val) not among its timesteps {timesteps}")
    return timesteps.index(cal.best_timestep)


def split_features(dataset_h5, inference_h5, crf_h5, calibration_h5, split: str) -> pd.DataFrame:
    """One row per image of ``split``: id, every feature, and ``dice`` of the final mask where truth exists.

    Files are matched to the dataset by image id; the outputs are the calibration's. A split with masks
    gives only its rows with a mask (diffseg.h5io.read_labelled: a ``prepare.labelled`` subset of val).
    """
    data = _split_data(dataset_h5, split)
    ids = data["ids"]
    if not ids:
        raise InputError(dataset_h5, f"split '{split}' holds no images")
    cal = load_calibration(calibration_h5)
    inf = read_h5(inference_h5, ["maps", "timesteps"])
    check_split_attr(inference_h5, inf["attrs"], split)
    crf = read_h5(crf_h5, ["fused", "rounds"])
    inf_rows, crf_rows = match_rows(ids, inf["ids"], inference_h5), match_rows(ids, crf["ids"], crf_h5)
    best, centre = best_index(cal, inf["timesteps"], inference_h5), probability_centre(cal)
    rows = []
    for i, image_id in enumerate(ids):
        probabilities, binary = apply_calibration(inf["maps"][inf_rows[i]], cal)
        rows.append({"id": image_id, **risk_features(data["images"][i], probabilities, binary,
                                                     crf["fused"][crf_rows[i]], crf["rounds"][crf_rows[i]],
                                                     best_index=best, centre=centre)})
    table = pd.DataFrame(rows, columns=["id", *FEATURES])
    if "masks" in data:
        fused = crf["fused"][crf_rows].astype(bool)
        table["dice"] = [dice(f, t) for f, t in zip(fused, data["masks"].astype(bool))]
    return table


def _split_data(dataset_h5, split: str) -> dict:
    """ids and images of a split, with ``masks`` of its labelled rows only where it has masks."""
    with open_h5(dataset_h5) as f:
        has_masks = split in f and "masks" in f[split]
    return read_labelled(dataset_h5, split, ["images"]) if has_masks else read_h5(dataset_h5, ["images"], group=split)


# ----------------------------------------------------------------------------- the model


@dataclass
class RiskModel:
    """Standardisation and logistic-regression coefficients over ``features`` (one entry per feature)."""

    features: list
    mean: list
    scale: list
    coef: list
    intercept: float
    C: float = 1.0
    fail_dice: float = 0.7
    fitted: bool = True  # False: val had one class only; the risk is then the constant prevalence
    # +1 where a HIGHER value went with failure on val, -1 where it went with success: how each single
    # feature is read when it is ranked alone (orientation chosen on val, never on the reported split)
    directions: list = field(default_factory=list)

    def __post_init__(self):
        n = len(self.features)
        unknown = [f for f in self.features if f not in FEATURES]
        if unknown:
            raise ValueError(f"risk model: unknown feature(s) {unknown}; known: {list(FEATURES)}")
        if not self.directions:
            self.directions = [1] * n
        if not (len(self.mean) == len(self.scale) == len(self.coef) == len(self.directions) == n) or n == 0:
            raise ValueError(f"risk model: {n} features but {len(self.mean)} means, {len(self.scale)} scales, "
                             f"{len(self.coef)} coefficients")


def fit_risk(table: pd.DataFrame, *, fail_dice: float = 0.7, C: float = 1.0,
             features: Sequence[str] = FEATURES) -> tuple[RiskModel, dict]:
    """Fit the risk model on a VALIDATION table (features + ``dice``): target ``dice < fail_dice``.

    Features are standardised (val mean and standard deviation), then an L2 logistic regression with
    inverse strength ``C`` is fitted. Val with a single class cannot rank anything: the model is then
    the constant (smoothed) failure rate, with a warning. Returns (model, report).
    """
    features = list(features)
    missing = [c for c in [*features, "dice"] if c not in table]
    if missing:
        raise ValueError(f"fit_risk: the table lacks column(s) {missing}")
    if len(table) == 0:
        raise ValueError("fit_risk: no images to fit on")
    x = table[features].to_numpy(np.float64)
    failed = table["dice"].to_numpy() < fail_dice
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)  # a constant feature contributes nothing
    n_fail = int(failed.sum())
    if n_fail in (0, len(failed)):
        logger.warning("risk: all %d validation images fall on one side of Dice %g: no model can be fitted; "
                       "the risk is the constant failure rate", len(failed), fail_dice)
        coef, intercept, fitted = np.zeros(len(features)), float(np.log((n_fail + 0.5) / (len(failed) - n_fail + 0.5))), False
    else:
        from sklearn.linear_model import LogisticRegression

        reg = LogisticRegression(C=C, max_iter=1000).fit((x - mean) / scale, failed)
        coef, intercept, fitted = reg.coef_[0], float(reg.intercept_[0]), True
    directions = [_direction(column, failed) for column in x.T]
    model = RiskModel(features=features, mean=mean.tolist(), scale=scale.tolist(), coef=np.asarray(coef).tolist(),
                      intercept=intercept, C=float(C), fail_dice=float(fail_dice), fitted=fitted,
                      directions=directions)
    risk = apply_risk(model, table)
    report = {"n_images": len(table), "n_failures": n_fail, "fitted": fitted,
              "val_auroc_in_sample": auroc(risk, failed),
              "coefficients": dict(zip(features, np.round(coef, 4).tolist()))}
    logger.info("risk model fitted on val: %s", report)
    return model, report


def _direction(values: np.ndarray, failed: np.ndarray) -> int:
    """-1 when lower values went with failure (AUROC < 0.5), else +1 (also when a class is empty)."""
    score = auroc(values, failed)
    return -1 if score is not None and score < 0.5 else 1


def apply_risk(model: RiskModel, features) -> np.ndarray:
    """Failure probability of every image: ``features`` is a DataFrame (rows = images) or one image's dict."""
    frame = pd.DataFrame([features]) if isinstance(features, Mapping) else features
    missing = [f for f in model.features if f not in frame]
    if missing:
        raise ValueError(f"apply_risk: feature(s) {missing} missing; the model needs {model.features}")
    x = frame[model.features].to_numpy(np.float64)
    logit = ((x - np.asarray(model.mean)) / np.asarray(model.scale)) @ np.asarray(model.coef) + model.intercept
    return 1.0 / (1.0 + np.exp(-logit))


def save_risk_model(path, model: RiskModel, report: dict) -> None:
    """Write the model (features, standardisation, coefficients) and its fit report as JSON."""
    payload = {"version": RISK_FILE_VERSION, "fitted_on": "val", **asdict(model), "report": report}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")


def load_risk_model(path, text: str | bytes | None = None) -> RiskModel:
    """Read risk.json back (``text``: its content, already read, e.g. from a model bundle; ``path`` then names
    where it came from); a missing key or unknown feature is an error naming the file."""
    try:
        payload = json.loads(open(path).read() if text is None else text)
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(path, f"cannot read the risk model ({err})") from err
    keys = ("features", "mean", "scale", "coef", "intercept", "C", "fail_dice", "fitted", "directions")
    missing = [k for k in keys if k not in payload]
    if missing:
        raise InputError(path, f"missing key(s) {missing} (expected a risk.json written by rule fit_risk)")
    try:
        return RiskModel(**{k: payload[k] for k in keys})
    except ValueError as err:
        raise InputError(path, str(err)) from err


def informative_features(features: Sequence[str], n_rounds: int, crf_h5) -> list[str]:
    """``features`` less CRF disagreement when the CRF ran ``n_rounds`` = 1 round (diffseg.crf.rounds_to_run):
    one round cannot disagree with itself, so the feature is 0 on every image and would only add a zero column.
    """
    if n_rounds > 1 or "crf_disagreement" not in features:
        return list(features)
    kept = [f for f in features if f != "crf_disagreement"]
    if not kept:
        raise InputError(crf_h5, "risk.features is [crf_disagreement] only, but the CRF ran a single round, so "
                                 "it is 0 on every image: add features to risk.features")
    logger.info("risk: the CRF ran one round (%s), so CRF disagreement is 0 on every image: left out of the model",
                crf_h5)
    return kept


def crf_rounds(crf_h5) -> int:
    """How many CRF rounds crf.h5 holds per image (the K of its ``rounds`` (N, K, R, R))."""
    with open_h5(crf_h5) as f:
        require(f, ("rounds",), crf_h5)
        return int(f["rounds"].shape[1])


def run_fit_risk(dataset_h5, val_inference_h5, val_crf_h5, calibration_h5, out_json, *, fail_dice: float = 0.7,
                 C: float = 1.0, features: Sequence[str] = FEATURES) -> dict:
    """Features of the val split, the model fitted on them, written to ``out_json``. Returns the fit report.

    A feature that is constant by construction (:func:`informative_features`) is left out of ``features``.
    """
    table = split_features(dataset_h5, val_inference_h5, val_crf_h5, calibration_h5, "val")
    if "dice" not in table:
        raise InputError(dataset_h5, "split 'val' has no masks: the risk model needs val Dice")
    features = informative_features(features, crf_rounds(val_crf_h5), val_crf_h5)
    model, report = fit_risk(table, fail_dice=fail_dice, C=C, features=features)
    save_risk_model(out_json, model, report)
    return report


# ----------------------------------------------------------------------------- evaluation


def score_rankings(table: pd.DataFrame, risk: np.ndarray, model: RiskModel, fail_dice: float) -> pd.DataFrame:
    """AUROC and average precision for ``dice < fail_dice`` of the risk and of every single feature of FEATURES.

    Each feature is read in its val direction (``model.directions``; a feature the model does not use
    is read as higher = riskier), so 1 = ranks all failures first and 0.5 = chance on every row.
    """
    failed = table["dice"].to_numpy() < fail_dice
    direction = dict(zip(model.features, model.directions))
    rows = [{"score": "risk", "direction": 1, "auroc": auroc(risk, failed),
             "average_precision": average_precision(risk, failed)}]
    for name in ranked_features(table):
        sign = direction.get(name, 1)
        s = sign * table[name].to_numpy(np.float64)
        rows.append({"score": name, "direction": sign, "auroc": auroc(s, failed),
                     "average_precision": average_precision(s, failed)})
    return pd.DataFrame(rows)


def ranked_features(table: pd.DataFrame) -> list[str]:
    """The FEATURES of ``table`` that vary over its images: a feature equal on every image (CRF disagreement
    where the CRF ran one round) ranks nothing, so the table leaves it out instead of printing AUROC 0.5."""
    return [name for name in FEATURES if name in table and np.ptp(table[name].to_numpy(np.float64)) > 0]


def constant_features(table: pd.DataFrame) -> list[str]:
    """The FEATURES of ``table`` that are the same on every image (left out of the ranking table)."""
    return [name for name in FEATURES if name in table and name not in ranked_features(table)]


def review_order(risk: np.ndarray, ids: Sequence[str]) -> np.ndarray:
    """Row order from riskiest to safest (ties: by id), the order of the review queue."""
    return np.lexsort((np.asarray(ids, dtype=object).astype(str), -np.asarray(risk, np.float64)))


def risk_coverage(dice_values: np.ndarray, risk: np.ndarray, ids: Sequence[str],
                  fractions: Sequence[float] = REVIEW_FRACTIONS) -> pd.DataFrame:
    """Mean Dice of the images kept when the riskiest ``fraction`` (rounded to whole images) goes to review.

    ``oracle_dice``: the same with the truly worst images reviewed (the best any risk score can do).
    """
    d = np.asarray(dice_values, np.float64)
    by_risk = d[review_order(risk, ids)]
    by_truth = np.sort(d)
    rows = []
    for frac in fractions:
        n_review = int(round(frac * len(d)))
        if n_review >= len(d):
            raise ValueError(f"risk_coverage: reviewing {frac:.0%} of {len(d)} images leaves none")
        rows.append({"reviewed_fraction": float(frac), "n_reviewed": n_review, "n_kept": len(d) - n_review,
                     "kept_mean_dice": float(by_risk[n_review:].mean()),
                     "oracle_mean_dice": float(by_truth[n_review:].mean())})
    return pd.DataFrame(rows)


def _queue_table(table: pd.DataFrame, risk: np.ndarray) -> pd.DataFrame:
    """id, risk, the features, and ``dice`` where the table has it: the review queue's columns."""
    scores = table.assign(risk=np.asarray(risk, np.float64))
    return scores[["id", "risk", *[f for f in FEATURES if f in scores], *(["dice"] if "dice" in scores else [])]]


def review_queue(table: pd.DataFrame, risk: np.ndarray) -> pd.DataFrame:
    """Every image, riskiest first (diffseg.review's one ordering): rank, sorted_by, id, risk, features, dice."""
    return review.review_queue(_queue_table(table, risk))


def write_review_queue(path, table: pd.DataFrame, risk: np.ndarray) -> pd.DataFrame:
    """Write review_queue.csv (see :func:`review_queue`) and return it."""
    return review.write_review_queue(_queue_table(table, risk), path)


# ----------------------------------------------------------------------------- pixel-level reliability


def reliability_table(predicted: np.ndarray, truth: np.ndarray, n_bins: int = RELIABILITY_BINS) -> pd.DataFrame:
    """Reliability of a per-pixel lesion frequency (e.g. the consistency map) against the truth.

    Pixels are binned by predicted value into ``n_bins`` equal bins of [0, 1] (the last one closed);
    per bin: pixel count, mean predicted value and observed lesion fraction. Empty bins are kept (count 0).
    """
    p = np.asarray(predicted, np.float64).ravel()
    y = np.asarray(truth, bool).ravel()
    if p.shape != y.shape:
        raise ValueError(f"reliability_table: {p.size} predicted pixels but {y.size} truth pixels")
    if p.size and (p.min() < 0 or p.max() > 1):
        raise ValueError(f"reliability_table: predicted values must lie in [0, 1], got [{p.min()}, {p.max()}]")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1], right=False), 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_pred = np.bincount(which, weights=p, minlength=n_bins) / count
        observed = np.bincount(which, weights=y.astype(np.float64), minlength=n_bins) / count
    return pd.DataFrame({"bin_low": edges[:-1], "bin_high": edges[1:], "n_pixels": count,
                         "mean_predicted": mean_pred, "observed_fraction": observed})


def expected_calibration_error(table: pd.DataFrame) -> float:
    """Pixel-weighted mean |mean predicted - observed fraction| over the bins of :func:`reliability_table`."""
    filled = table[table["n_pixels"] > 0]
    if filled.empty:
        raise ValueError("expected_calibration_error: no pixels")
    weights = filled["n_pixels"] / filled["n_pixels"].sum()
    return float((weights * (filled["mean_predicted"] - filled["observed_fraction"]).abs()).sum())


# ----------------------------------------------------------------------------- table.md section


def format_score(value) -> str:
    """A table cell: three decimals, or n/a for a missing or NaN value."""
    return "n/a" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.3f}"


def risk_markdown(table: pd.DataFrame, risk: np.ndarray, model: RiskModel, fail_dice: float) -> list[str]:
    """table.md lines: AUROC / average precision of the risk and of every feature, and the risk-coverage table."""
    failed = table["dice"].to_numpy() < fail_dice
    rankings = score_rankings(table, risk, model, fail_dice)
    how = (f"L2 logistic regression (C = {model.C:g}) over {len(model.features)} standardised features, fitted on "
           "the val split only" if model.fitted else
           "NOT fitted (val had a single class): a constant, so it ranks nothing")
    lines = ["## Which images to send to review? Risk score and uncertainty features", "",
             f"{int(failed.sum())} of {len(table)} images have a final Dice < {fail_dice:g} (failure rate "
             f"{failed.mean():.3f}, the average precision of a random ranking). Risk = {how}. AUROC and average "
             "precision of each score for ranking the failures first (0.5 = chance, 1 = perfect); a single feature "
             "is read in the direction it had on val (lower = riskier where marked):", "",
             "| score | AUROC | average precision |", "|---|---|---|"]
    for row in rankings.itertuples():
        label = "**risk score**" if row.score == "risk" else FEATURE_LABELS[row.score]
        label += " (lower = riskier)" if row.direction < 0 else ""
        lines.append(f"| {label} | {format_score(row.auroc)} | {format_score(row.average_precision)} |")
    constant = constant_features(table)
    if constant:
        lines += ["", "Left out of the ranking (the same on every image, so they rank nothing): "
                  + "; ".join(FEATURE_LABELS[name] for name in constant) + "."]
    coverage = risk_coverage(table["dice"], risk, table["id"])
    lines += ["", "Risk-coverage: mean Dice of the images kept when the riskiest fraction goes to review "
              "(oracle: the truly worst go; review_queue.csv lists every image, riskiest first):", "",
              "| sent to review | images kept | mean Dice kept | oracle mean Dice kept |", "|---|---|---|---|"]
    lines += [f"| {row.reviewed_fraction:.0%} ({row.n_reviewed}) | {row.n_kept} | {format_score(row.kept_mean_dice)} | "
              f"{format_score(row.oracle_mean_dice)} |" for row in coverage.itertuples()]
    return lines
