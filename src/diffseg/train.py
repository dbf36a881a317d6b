"""The one trainer: AdamW + warm-up, EMA, autocast, resumable atomic checkpoints, NaN guard, CSV log.

Over 350 lines: the Trainer and the checkpoint file it writes and resumes from change together.

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


def advance_progress(bar: tqdm, elapsed_s: float, max_minutes: float | None) -> None:
    """One step done: a step bar moves by one, a budget bar to the seconds used (at most the budget)."""
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


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    """Generic training loop: sample_batch(step, generator, device) -> batch; loss_fn(model, batch, generator) -> loss.

    The generator handed to both is a CPU generator seeded from (seed, step); code that draws on
    the GPU derives a device generator from it (diffseg.runtime.device_generator).
    evaluate(model_ema) -> float (higher is better unless maximize=False) runs every eval_every
    steps; after `patience` evaluations without improvement training stops early. The best EMA
    weights are the ones the final checkpoint keeps.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: Callable,
        sample_batch: Callable,
        *,
        checkpoint: str | os.PathLike,
        resume_path: str | os.PathLike,
        metrics_csv: str | os.PathLike,
        config: dict,
        steps: int,
        lr: float = 2e-4,
        warmup_steps: int = 500,
        weight_decay: float = 0.0,
        ema_decay: float = 0.999,
        grad_clip: float = 1.0,
        checkpoint_every: int = 500,
        log_every: int = 50,
        seed: int = 0,
        precision: str = "auto",
        compile: bool = False,
        channels_last: bool = True,
        device: str = "auto",
        evaluate: Callable[[torch.nn.Module], float] | None = None,
        eval_every: int | None = None,
        patience: int | None = None,
        maximize: bool = True,
        kind: str = "ddpm",
        batch_setting: str = "train.batch_size",
        max_minutes: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if steps < 1 or checkpoint_every < 1 or log_every < 1:
            raise ValueError(f"train: steps, checkpoint_every and log_every must be >= 1, "
                             f"got {steps}, {checkpoint_every}, {log_every}")
        if max_minutes is not None and not max_minutes > 0:
            raise ValueError(f"train: max_minutes must be a positive number of minutes or None, got {max_minutes!r}")
        if evaluate is not None and not eval_every:
            raise ValueError("evaluate given without eval_every")
        if Path(resume_path) == Path(checkpoint):
            raise ValueError(f"resume_path must differ from the final checkpoint {checkpoint}")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(precision, self.device)
        self.checkpoint, self.resume_path, self.metrics_csv = Path(checkpoint), Path(resume_path), Path(metrics_csv)
        self.config = plain_config(config)
        self.loss_fn, self.sample_batch = loss_fn, sample_batch
        self.steps, self.lr, self.warmup_steps = steps, lr, warmup_steps
        self.ema_decay, self.grad_clip = ema_decay, grad_clip
        self.checkpoint_every, self.log_every, self.seed = checkpoint_every, log_every, seed
        self.evaluate, self.eval_every, self.patience, self.maximize = evaluate, eval_every, patience, maximize
        self.kind, self.batch_setting = kind, batch_setting  # batch_setting: the config key an OOM error names
        self.max_minutes, self.clock = max_minutes, clock  # clock: seconds, injectable for tests
        use_cl = channels_last and uses_channels_last(self.device)
        self.memory_format = torch.channels_last if use_cl else torch.contiguous_format

        self.model = model.to(self.device, memory_format=self.memory_format)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.train_model = torch.compile(self.model) if compile else self.model
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=lr, weight_decay=weight_decay, fused=self.device.type == "cuda"
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.step = 0
        self.rows: list[dict] = []
        self.best_metric: float | None = None
        self.best_ema: dict | None = None
        self.evals_since_best = 0
        self.last_saved_step: int | None = None
        self.stopped_by: str | None = None  # None (all steps), "early_stopping" or "max_minutes"
        logger.info("training on %s (%s), autocast %s, torch %s, compile=%s, channels_last=%s",
                    self.device, self._device_name(), str(self.dtype).replace("torch.", ""), torch.__version__,
                    compile, self.memory_format == torch.channels_last)

    def _device_name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"

    # -- checkpoint state ---------------------------------------------------------------------

    def state(self, final: bool = False) -> dict:
        ema_state = self.best_ema if final and self.best_ema is not None else self.ema.state_dict()
        return {
            "model": self.model.state_dict(),
            "ema": ema_state,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "step": self.step,
            "config": self.config,
            "version": __version__,
            "kind": self.kind,
            "best_metric": self.best_metric,
            "steps_planned": self.steps,
            "stopped_by": self.stopped_by,
            "trainer_state": {"rows": self.rows, "best_ema": self.best_ema, "evals_since_best": self.evals_since_best},
        }

    def resume(self) -> None:
        """Continue from the resume file if one exists; refuse if it belongs to a different model."""
        if not self.resume_path.exists():
            return
        ckpt = load_checkpoint(self.resume_path, map_location=self.device, kind=self.kind)
        differing = config_mismatch(ckpt["config"], self.config)
        if differing or shape_signature(ckpt["model"]) != shape_signature(self.model.state_dict()):
            raise CheckpointError(
                self.resume_path,
                f"resume file was written for a different model/config (differs in {differing or 'parameter shapes'}); "
                "delete it to start afresh or restore the config it was trained with",
            )
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"] is not None and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        state = ckpt.get("trainer_state", {})
        self.rows = list(state.get("rows", []))
        self.best_ema = state.get("best_ema")
        self.evals_since_best = state.get("evals_since_best", 0)
        self.step = self.last_saved_step = ckpt["step"]
        self.best_metric = ckpt["best_metric"]
        logger.info("resuming from %s at step %d of %d", self.resume_path, self.step, self.steps)

    def save_resume(self) -> None:
        self.check_weights_finite()
        save_checkpoint(self.resume_path, self.state())
        self.last_saved_step = self.step

    # -- one step -----------------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        return self.lr * min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps > 0 else self.lr

    def train_step(self, step: int) -> tuple[torch.Tensor, int]:
        seed = step_seed(self.seed, step)
        torch.manual_seed(seed)  # dropout and any global-RNG use inside the model
        generator = torch.Generator().manual_seed(seed)  # CPU: augmentation draws there; see runtime.device_generator
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(step)
        batch = self.sample_batch(step, generator, self.device)
        with name_the_setting_on_oom(self.batch_setting, batch_size_of(batch), f"at training step {step + 1}",
                                     then=self.kept_checkpoint_text()):
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                loss = self.loss_fn(self.train_model, batch, generator).float()
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
        if self.grad_clip and self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.update_ema()
        return loss.detach(), batch_size_of(batch)

    @torch.no_grad()
    def update_ema(self) -> None:
        ema_params = list(self.ema.parameters())
        torch._foreach_lerp_(ema_params, list(self.model.parameters()), 1.0 - self.ema_decay)
        for ema_buf, buf in zip(self.ema.buffers(), self.model.buffers()):
            ema_buf.copy_(buf)

    # -- guards, logging, evaluation ----------------------------------------------------------

    def kept_checkpoint_text(self) -> str:
        if self.last_saved_step is None:
            return f"no resume checkpoint was written yet ({self.resume_path})"
        return f"the last good checkpoint is kept at {self.resume_path} (step {self.last_saved_step})"

    def check_losses(self, losses: list[torch.Tensor], first_step: int) -> list[float]:
        values = torch.stack(losses).cpu().tolist()  # one device sync per logging window
        for i, value in enumerate(values):
            if not math.isfinite(value):
                raise RuntimeError(
                    f"training stopped: loss is {value} at step {first_step + i + 1}; {self.kept_checkpoint_text()}"
                )
        return values

    @torch.no_grad()
    def check_weights_finite(self) -> None:
        finite = torch.stack([p.isfinite().all() for p in self.model.parameters()]).all()
        if not bool(finite):
            raise RuntimeError(
                f"training stopped: non-finite weights at step {self.step}; {self.kept_checkpoint_text()}"
            )

    def run_evaluation(self) -> bool:
        """Evaluate the EMA model; return True when patience is exhausted."""
        torch.manual_seed(step_seed(self.seed, -self.step))
        with torch.no_grad():
            metric = float(self.evaluate(self.ema))
        best = self.best_metric
        improved = best is None or (metric > best if self.maximize else metric < best)
        if improved:
            self.best_metric, self.evals_since_best = metric, 0
            self.best_ema = {k: v.detach().clone() for k, v in self.ema.state_dict().items()}
        else:
            self.evals_since_best += 1
        logger.info("step %d: evaluation %.6g (best %.6g)", self.step, metric, self.best_metric)
        return self.patience is not None and self.evals_since_best >= self.patience

    def is_boundary(self, step: int) -> bool:
        return (step % self.log_every == 0 or step % self.checkpoint_every == 0 or step == self.steps
                or (self.eval_every is not None and step % self.eval_every == 0))

    # -- the loop -----------------------------------------------------------------------------

    def out_of_time(self, elapsed_s: float) -> bool:
        """True once `max_minutes` of wall time (self.clock, seconds) have passed."""
        return self.max_minutes is not None and elapsed_s >= 60.0 * self.max_minutes

    def fit(self) -> dict:
        """Train to `steps` (or early stop, or the time budget), write the final checkpoint and CSV.

        The resume file is removed at the end, except after a time-budget stop: then it holds the
        step reached, so a rerun continues.
        """
        self.resume()
        resumed_from = self.step if self.step else None
        if self.step >= self.steps:
            logger.warning("resume file %s is already at step %d >= steps %d", self.resume_path, self.step, self.steps)
        self.model.train()
        losses: list[torch.Tensor] = []
        window_images, window_start, window_first = 0, time.perf_counter(), self.step
        total_images, t0, budget_start = 0, time.perf_counter(), self.clock()
        bar = progress_bar(f"train {self.kind}", self.steps, self.step, self.max_minutes)
        while self.step < self.steps and self.stopped_by is None:
            loss, n_images = self.train_step(self.step)
            losses.append(loss)
            window_images += n_images
            self.step += 1
            elapsed_s = self.clock() - budget_start
            advance_progress(bar, elapsed_s, self.max_minutes)
            out_of_time = self.out_of_time(elapsed_s)
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
            if self.evaluate is not None and self.step % self.eval_every == 0 and self.run_evaluation():
                self.stopped_by = "early_stopping"
            if out_of_time and self.stopped_by is None and self.step < self.steps:
                self.stopped_by = "max_minutes"
            if self.step < self.steps and (self.stopped_by == "max_minutes" or
                                           (self.stopped_by is None and self.step % self.checkpoint_every == 0)):
                self.save_resume()
            losses, window_images, window_start, window_first = [], 0, time.perf_counter(), self.step
        bar.close()
        if self.stopped_by == "early_stopping":
            logger.info("early stop at step %d: no improvement in %d evaluations", self.step, self.patience)
        if self.stopped_by == "max_minutes":
            logger.info("time budget of %g min reached: training stopped at step %d of %d; the final checkpoint "
                        "holds the EMA weights of step %d, and %s is kept so a rerun with a larger budget continues",
                        self.max_minutes, self.step, self.steps, self.step, self.resume_path)
        return self.finish(resumed_from, total_images / max(time.perf_counter() - t0, 1e-9))

    def finish(self, resumed_from: int | None, images_per_s: float) -> dict:
        self.check_weights_finite()
        save_checkpoint(self.checkpoint, self.state(final=True))
        write_metrics_csv(self.metrics_csv, self.rows)
        if self.stopped_by != "max_minutes":
            self.resume_path.unlink(missing_ok=True)
        summary = {
            "kind": self.kind, "steps": self.step, "steps_planned": self.steps,
            "final_loss": self.rows[-1]["loss"] if self.rows else None, "best_metric": self.best_metric,
            "stopped_early": self.stopped_by == "early_stopping", "stopped_by": self.stopped_by,
            "resumed_from": resumed_from, "images_per_s": images_per_s, "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""), "checkpoint": str(self.checkpoint),
        }
        logger.info("training done: %s", summary)
        return summary
