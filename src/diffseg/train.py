"""The one trainer: AdamW + warm-up, EMA, autocast, resumable atomic checkpoints, NaN guard, CSV log.

Over 350 lines: the Trainer, its parts and the checkpoint file they write and resume from change together.
The Trainer takes the model, the loss function, the batch sampler, its settings
(:class:`diffseg.settings.TrainSettings`) and its files (:class:`RunFiles`), and composes the parts,
each testable alone: the EMA weights and the best of them (:class:`EMA`), evaluation with early
stopping (:class:`EarlyStopping`), the wall-time budget (:class:`TimeBudget`) and the checkpoint,
resume and CSV files (:class:`RunFiles`).

Every step's randomness (batch sampling, noise, dropout) is seeded from (seed, step), so a run
that is interrupted and resumed from its resume file ends with exactly the weights of an
uninterrupted run. The resume file is not the rule's declared output (Snakemake deletes an
incomplete job's outputs): it is written every `checkpoint_every` steps and removed once the
final checkpoint is in place.

A time budget (`max_minutes`) ends training after the step during which it runs out: the final
checkpoint (EMA weights) and the CSV are written as at the end of a full run, and the resume file
is kept at that step, so a rerun with a larger budget (or none) continues from there.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import logging
import math
import os
import pickle
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from diffseg import __version__
from diffseg.atomic import atomic_path
from diffseg.imageio import InputError
from diffseg.runtime import name_the_setting_on_oom, resolve_device, resolve_dtype, uses_channels_last
from diffseg.seeding import image_seed
from diffseg.settings import TrainSettings

logger = logging.getLogger(__name__)

CHECKPOINT_KEYS = ("model", "ema", "optimizer", "scaler", "step", "config", "version", "kind", "best_metric")
# config sections that fix the network or what it learns: a resume file must agree on them
RESUME_MUST_MATCH = ("model", "image_size", "diffusion")
CSV_COLUMNS = ("step", "loss", "lr", "images_per_s")


class CheckpointError(InputError):
    """A checkpoint file that cannot be used; the message starts with its path."""


# ----------------------------------------------------------------------------- checkpoint files


def plain_config(config: dict) -> dict:
    """JSON-normalised copy (tuples -> lists, numpy scalars -> python) so configs compare and load safely."""

    def to_builtin(value: Any) -> Any:
        if hasattr(value, "item"):
            return value.item()
        if hasattr(value, "tolist"):
            return value.tolist()
        raise TypeError(f"config value {value!r} ({type(value).__name__}) is not JSON-serialisable")

    return json.loads(json.dumps(config, default=to_builtin))


def save_checkpoint(path: str | os.PathLike, checkpoint: dict) -> None:
    """torch.save the checkpoint dict atomically (temporary file, then rename)."""
    missing = [k for k in CHECKPOINT_KEYS if k not in checkpoint]
    if missing:
        raise ValueError(f"{path}: refusing to save a checkpoint without keys {missing}")
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # a file object: a full disk keeps its OSError
        torch.save(checkpoint, fh)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", kind: str | None = None) -> dict:
    """Load and validate a diffseg checkpoint; CheckpointError names the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "checkpoint file not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
        problem = f"cannot be read: corrupt or truncated file, or not a torch checkpoint ({type(err).__name__}: {err})"
        raise CheckpointError(path, problem) from err
    if not isinstance(ckpt, dict):
        raise CheckpointError(path, f"not a diffseg checkpoint (holds a {type(ckpt).__name__}, not a dict)")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(path, f"not a diffseg checkpoint (missing keys {missing})")
    if kind is not None and ckpt["kind"] != kind:
        raise CheckpointError(path, f"checkpoint kind is {ckpt['kind']!r}, expected {kind!r}")
    return ckpt


def write_metrics_csv(path: str | os.PathLike, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows({k: row[k] for k in CSV_COLUMNS} for row in rows)


# ----------------------------------------------------------------------------- small helpers


@contextlib.contextmanager
def seeded(seed: int):
    """Seed the global RNG inside the block only (e.g. weight initialisation), leaving it as it was after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def resume_path_for(checkpoint: str | os.PathLike) -> Path:
    """The resume file beside a rule's final checkpoint (not a declared output: Snakemake keeps it)."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + ".resume.pt")


def step_seed(seed: int, step: int) -> int:
    return image_seed(seed, f"train-step-{step}")


def progress_bar(desc: str, steps: int, step: int, max_minutes: float | None) -> tqdm:
    """The training loop's bar: over the steps, or with a time budget over its seconds.

    With ``max_minutes`` the step bound is only a cap (often huge), so a bar over steps would promise
    the wrong end (hours for a 3-minute budget); the budget's bar shows the seconds used of it and
    the time left. :func:`advance_progress` moves either after each step.
    """
    if max_minutes is None:
        return tqdm(total=steps, initial=step, mininterval=5, desc=desc, unit="step")
    return tqdm(total=round(60.0 * max_minutes), mininterval=5, desc=f"{desc} ({max_minutes:g} min budget)",
                unit="s", bar_format="{l_bar}{bar}| {n:.0f}/{total} s [{elapsed}<{remaining}{postfix}]")


def advance_progress(bar: tqdm, elapsed_s: float | None, max_minutes: float | None) -> None:
    """One step done: a step bar moves by one, a budget bar to the seconds used (at most the budget;
    ``elapsed_s`` is None only without one, :meth:`TimeBudget.elapsed`)."""
    if max_minutes is None:
        bar.update(1)
    else:
        bar.update(min(elapsed_s, bar.total) - bar.n)


def batch_size_of(batch: Any) -> int:
    """Images in a batch: the length of its first tensor (batch may be a tensor, sequence or dict)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    items = batch.values() if isinstance(batch, dict) else batch
    for item in items:
        if isinstance(item, torch.Tensor):
            return item.shape[0]
    raise TypeError("sample_batch must return a tensor, or a sequence/dict holding at least one tensor")


def config_mismatch(saved: dict, current: dict) -> list[str]:
    return [key for key in RESUME_MUST_MATCH if saved.get(key) != current.get(key)]


def shape_signature(state: dict) -> dict:
    return {k: tuple(v.shape) for k, v in state.items()}


# ----------------------------------------------------------------------------- the trainer's parts


class EMA:
    """Exponential moving average of a model's weights, and a snapshot of the best evaluated average.

    The final checkpoint keeps the best snapshot when evaluations ran (early stopping), else the average.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.best: dict | None = None

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """average += (1 - decay) * (weights - average); buffers (e.g. BatchNorm statistics) are copied."""
        torch._foreach_lerp_(list(self.model.parameters()), list(model.parameters()), 1.0 - self.decay)
        for ema_buf, buf in zip(self.model.buffers(), model.buffers()):
            ema_buf.copy_(buf)

    def keep_best(self) -> None:
        """Snapshot the current average as the best one (a copy: later updates leave it unchanged)."""
        self.best = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def final_state(self) -> dict:
        return self.best if self.best is not None else self.model.state_dict()


class EarlyStopping:
    """``evaluate(ema_model) -> metric`` every ``every`` steps; stop after ``patience`` evaluations without
    improvement (None: never stop early). Higher is better unless ``maximize=False``."""

    def __init__(self, evaluate: Callable[[torch.nn.Module], float], every: int, patience: int | None = None,
                 maximize: bool = True):
        if not every or every < 1:
            raise ValueError(f"evaluation every {every!r} steps: give a number of steps >= 1")
        self.evaluate, self.every, self.patience, self.maximize = evaluate, every, patience, maximize
        self.best: float | None = None  # the best metric so far
        self.evals_since_best = 0

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def observe(self, metric: float) -> bool:
        """Record one evaluation's metric; True when it is the best so far."""
        improved = self.best is None or (metric > self.best if self.maximize else metric < self.best)
        if improved:
            self.best, self.evals_since_best = metric, 0
        else:
            self.evals_since_best += 1
        return improved

    @property
    def exhausted(self) -> bool:
        return self.patience is not None and self.evals_since_best >= self.patience


class TimeBudget:
    """A wall-time budget of ``max_minutes`` (None = none) on ``clock`` (seconds; injectable for tests).

    ``start`` reads the clock once; ``elapsed`` (and ``spent``) read it again only when there is a budget.
The training loop reads it once per step and moves its bar (:func:`progress_bar`) by that reading.
    """

    def __init__(self, max_minutes: float | None, clock: Callable[[], float] = time.monotonic):
        if max_minutes is not None and not max_minutes > 0:
            raise ValueError(f"train: max_minutes must be a positive number of minutes or None, got {max_minutes!r}")
        self.max_minutes, self.clock = max_minutes, clock
        self.started = 0.0

    def start(self) -> None:
        self.started = self.clock()

    def spent(self) -> bool:
        """True once max_minutes have passed since start()."""
        return self.over(self.elapsed())

    def elapsed(self) -> float | None:
        """Seconds since start() (one clock read), or None without a budget (the clock is not read)."""
        return None if self.max_minutes is None else self.clock() - self.started

    def over(self, elapsed_s: float | None) -> bool:
        """Whether an :meth:`elapsed` reading (None: no budget) has spent the budget."""
        return elapsed_s is not None and elapsed_s >= 60.0 * self.max_minutes


class RunFiles:
    """A training run's files: the final checkpoint, the resume file beside it and the CSV log.

    ``kind`` and ``config`` are the checkpoint's; a resume file must be of the same kind, agree on
    RESUME_MUST_MATCH and have the same parameter shapes. The resume file is written every
    ``checkpoint_every`` steps and removed once the final checkpoint is in place (unless a time-budget
    stop keeps it so that a rerun continues).
    """

    def __init__(self, checkpoint: str | os.PathLike, metrics_csv: str | os.PathLike, *, kind: str, config: dict,
                 resume_path: str | os.PathLike | None = None):
        self.checkpoint, self.metrics_csv = Path(checkpoint), Path(metrics_csv)
        self.resume_path = Path(resume_path) if resume_path is not None else resume_path_for(checkpoint)
        if self.resume_path == self.checkpoint:
            raise ValueError(f"resume_path must differ from the final checkpoint {checkpoint}")
        self.kind, self.config = kind, plain_config(config)
        self.last_saved_step: int | None = None

    def load_resume(self, map_location: torch.device, model_state: dict) -> dict | None:
        """The resume file's checkpoint (None when there is none); refuses one of another model or config."""
        if not self.resume_path.exists():
            return None
        ckpt = load_checkpoint(self.resume_path, map_location=map_location, kind=self.kind)
        differing = config_mismatch(ckpt["config"], self.config)
        if differing or shape_signature(ckpt["model"]) != shape_signature(model_state):
            raise CheckpointError(
                self.resume_path,
                f"resume file was written for a different model/config (differs in {differing or 'parameter shapes'}); "
                "delete it to start afresh or restore the config it was trained with",
            )
        self.last_saved_step = ckpt["step"]
        return ckpt

    def save_resume(self, state: dict) -> None:
        save_checkpoint(self.resume_path, state)
        self.last_saved_step = state["step"]

    def save_final(self, state: dict, rows: list[dict], keep_resume: bool = False) -> None:
        """The final checkpoint and the CSV log; the resume file goes unless ``keep_resume``."""
        save_checkpoint(self.checkpoint, state)
        write_metrics_csv(self.metrics_csv, rows)
        if not keep_resume:
            self.resume_path.unlink(missing_ok=True)

    def kept_checkpoint_text(self) -> str:
        """What a failed run leaves to continue from, for its error message."""
        if self.last_saved_step is None:
            return f"no resume checkpoint was written yet ({self.resume_path})"
        return f"the last good checkpoint is kept at {self.resume_path} (step {self.last_saved_step})"


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    """Generic training loop: sample_batch(step, generator, device) -> batch; loss_fn(model, batch, generator) -> loss.

    The generator handed to both is a CPU generator seeded from (settings.seed, step); code that draws
    on the GPU derives a device generator from it (diffseg.runtime.device_generator). The parts: the
    EMA weights (:class:`EMA`), optional evaluation with early stopping (:class:`EarlyStopping`; the
    final checkpoint keeps the best EMA weights), the time budget (:class:`TimeBudget`,
    ``settings.max_minutes``) and the files (:class:`RunFiles`). ``batch_setting`` is the config key an
    out-of-memory error names.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Callable, sample_batch: Callable, settings: TrainSettings,
                 files: RunFiles, *, stopping: EarlyStopping | None = None, batch_setting: str = "train.batch_size",
                 clock: Callable[[], float] = time.monotonic):
        self.settings, self.files, self.stopping = settings, files, stopping
        self.budget = TimeBudget(settings.max_minutes, clock)
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.precision, self.device)
        self.loss_fn, self.sample_batch, self.batch_setting = loss_fn, sample_batch, batch_setting
        use_cl = settings.channels_last and uses_channels_last(self.device)
        self.memory_format = torch.channels_last if use_cl else torch.contiguous_format

        self.model = model.to(self.device, memory_format=self.memory_format)
        self.ema = EMA(self.model, settings.ema_decay)
        self.train_model = torch.compile(self.model) if settings.compile else self.model
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay,
            fused=self.device.type == "cuda",
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.step = 0
        self.rows: list[dict] = []
        self.stopped_by: str | None = None  # None (all steps), "early_stopping" or "max_minutes"
        logger.info("training on %s (%s), autocast %s, torch %s, compile=%s, channels_last=%s",
                    self.device, self._device_name(), str(self.dtype).replace("torch.", ""), torch.__version__,
                    settings.compile, self.memory_format == torch.channels_last)

    def _device_name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"

    @property
    def best_metric(self) -> float | None:
        return self.stopping.best if self.stopping is not None else None

    # -- checkpoint state ---------------------------------------------------------------------

    def state(self, final: bool = False) -> dict:
        evals_since_best = self.stopping.evals_since_best if self.stopping is not None else 0
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.final_state() if final else self.ema.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "step": self.step,
            "config": self.files.config,
            "version": __version__,
            "kind": self.files.kind,
            "best_metric": self.best_metric,
            "steps_planned": self.settings.steps,
            "stopped_by": self.stopped_by,
            "trainer_state": {"rows": self.rows, "best_ema": self.ema.best, "evals_since_best": evals_since_best},
        }

    def resume(self) -> None:
        """Continue from the resume file if one exists; refuse if it belongs to a different model."""
        ckpt = self.files.load_resume(self.device, self.model.state_dict())
        if ckpt is None:
            return
        self.model.load_state_dict(ckpt["model"])
        self.ema.model.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"] is not None and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        state = ckpt.get("trainer_state", {})
        self.rows = list(state.get("rows", []))
        self.ema.best = state.get("best_ema")
        if self.stopping is not None:
            self.stopping.best, self.stopping.evals_since_best = ckpt["best_metric"], state.get("evals_since_best", 0)
        self.step = ckpt["step"]
        logger.info("resuming from %s at step %d of %d", self.files.resume_path, self.step, self.settings.steps)

    def save_resume(self) -> None:
        self.check_weights_finite()
        self.files.save_resume(self.state())

    # -- one step -----------------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        lr, warmup = self.settings.lr, self.settings.warmup_steps
        return lr * min(1.0, (step + 1) / warmup) if warmup > 0 else lr

    def train_step(self, step: int) -> tuple[torch.Tensor, int]:
        seed = step_seed(self.settings.seed, step)
        torch.manual_seed(seed)  # dropout and any global-RNG use inside the model
        generator = torch.Generator().manual_seed(seed)  # CPU: augmentation draws there; see runtime.device_generator
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(step)
        batch = self.sample_batch(step, generator, self.device)
        with name_the_setting_on_oom(self.batch_setting, batch_size_of(batch), f"at training step {step + 1}",
                                     then=self.files.kept_checkpoint_text()):
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                loss = self.loss_fn(self.train_model, batch, generator).float()
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
        if self.settings.grad_clip and self.settings.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.ema.update(self.model)
        return loss.detach(), batch_size_of(batch)

    # -- guards, logging, evaluation ----------------------------------------------------------

    def check_losses(self, losses: list[torch.Tensor], first_step: int) -> list[float]:
        values = torch.stack(losses).cpu().tolist()  # one device sync per logging window
        for i, value in enumerate(values):
            if not math.isfinite(value):
                raise RuntimeError(f"training stopped: loss is {value} at step {first_step + i + 1}; "
                                   f"{self.files.kept_checkpoint_text()}")
        return values

    @torch.no_grad()
    def check_weights_finite(self) -> None:
        finite = torch.stack([p.isfinite().all() for p in self.model.parameters()]).all()
        if not bool(finite):
            raise RuntimeError(f"training stopped: non-finite weights at step {self.step}; "
                               f"{self.files.kept_checkpoint_text()}")

    def run_evaluation(self) -> bool:
        """Evaluate the EMA model, keep its weights when best; return True when patience is exhausted."""
        torch.manual_seed(step_seed(self.settings.seed, -self.step))
        with torch.no_grad():
            metric = float(self.stopping.evaluate(self.ema.model))
        if self.stopping.observe(metric):
            self.ema.keep_best()
        logger.info("step %d: evaluation %.6g (best %.6g)", self.step, metric, self.stopping.best)
        return self.stopping.exhausted

    def is_boundary(self, step: int) -> bool:
        s = self.settings
        return (step % s.log_every == 0 or step % s.checkpoint_every == 0 or step == s.steps
                or (self.stopping is not None and self.stopping.due(step)))

    # -- the loop -----------------------------------------------------------------------------

    def fit(self) -> dict:
        """Train to `steps` (or early stop, or the time budget), write the final checkpoint and CSV.

        The resume file is removed at the end, except after a time-budget stop: then it holds the
        step reached, so a rerun continues.
        """
        steps = self.settings.steps
        self.resume()
        resumed_from = self.step if self.step else None
        if self.step >= steps:
            logger.warning("resume file %s is already at step %d >= steps %d", self.files.resume_path, self.step, steps)
        self.model.train()
        losses: list[torch.Tensor] = []
        window_images, window_start, window_first = 0, time.perf_counter(), self.step
        total_images, t0 = 0, time.perf_counter()
        self.budget.start()
        bar = progress_bar(f"train {self.files.kind}", steps, self.step, self.budget.max_minutes)
        while self.step < steps and self.stopped_by is None:
            loss, n_images = self.train_step(self.step)
            losses.append(loss)
            window_images += n_images
            self.step += 1
            elapsed_s = self.budget.elapsed()  # one clock read per step serves the bar and the stop
            advance_progress(bar, elapsed_s, self.budget.max_minutes)
            out_of_time = self.budget.over(elapsed_s)
            if not (out_of_time or self.is_boundary(self.step)):
                continue
            values = self.check_losses(losses, window_first)
            elapsed = time.perf_counter() - window_start
            row = {"step": self.step, "loss": sum(values) / len(values), "lr": self.lr_at(self.step - 1),
                   "images_per_s": window_images / max(elapsed, 1e-9)}
            self.rows.append(row)
            total_images += window_images
            bar.set_postfix(step=self.step, loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.1f}",
                            refresh=False)
            if self.stopping is not None and self.stopping.due(self.step) and self.run_evaluation():
                self.stopped_by = "early_stopping"
            if out_of_time and self.stopped_by is None and self.step < steps:
                self.stopped_by = "max_minutes"
            if self.step < steps and (self.stopped_by == "max_minutes" or
                                      (self.stopped_by is None and self.step % self.settings.checkpoint_every == 0)):
                self.save_resume()
            losses, window_images, window_start, window_first = [], 0, time.perf_counter(), self.step
        bar.close()
        self.log_stop()
        return self.finish(resumed_from, total_images / max(time.perf_counter() - t0, 1e-9))

    def log_stop(self) -> None:
        if self.stopped_by == "early_stopping":
            logger.info("early stop at step %d: no improvement in %d evaluations", self.step, self.stopping.patience)
        if self.stopped_by == "max_minutes":
            logger.info("time budget of %g min reached: training stopped at step %d of %d; the final checkpoint "
                        "holds the EMA weights of step %d, and %s is kept so a rerun with a larger budget continues",
                        self.budget.max_minutes, self.step, self.settings.steps, self.step, self.files.resume_path)

    def finish(self, resumed_from: int | None, images_per_s: float) -> dict:
        self.check_weights_finite()
        self.files.save_final(self.state(final=True), self.rows, keep_resume=self.stopped_by == "max_minutes")
        summary = {
            "kind": self.files.kind, "steps": self.step, "steps_planned": self.settings.steps,
            "final_loss": self.rows[-1]["loss"] if self.rows else None, "best_metric": self.best_metric,
            "stopped_early": self.stopped_by == "early_stopping", "stopped_by": self.stopped_by,
            "resumed_from": resumed_from, "images_per_s": images_per_s, "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""), "checkpoint": str(self.files.checkpoint),
        }
        logger.info("training done: %s", summary)
        return summary
