import csv
import math
import time

import h5py
import numpy as np
import pytest
import torch

from diffseg.augment import PairedAugment
from diffseg.ddpm import PairSampler, build_model, epsilon_loss, load_model, train_ddpm
from diffseg.schedule import Schedule, q_sample
from diffseg.settings import TrainSettings
from diffseg.train import (EMA, CheckpointError, EarlyStopping, RunFiles, TimeBudget, Trainer, load_checkpoint,
                           resume_path_for, save_checkpoint)

torch.set_num_threads(1)

R = 16
TINY_MODEL = dict(base_channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[8], num_heads=2,
                  dropout=0.1, class_dropout=0.0, padding="zeros")
TRAIN = dict(batch_size=8, lr=2e-3, warmup_steps=5, ema_decay=0.9, checkpoint_every=4, log_every=2, seed=3,
             device="cpu", precision="auto")
DIFFUSION = dict(T=100, beta_start=1e-4, beta_end=0.02)


def synthetic_pairs(n=10, seed=0):
    """Skin-coloured images with a dark disc (lesion) and the same skin without it (healthy twin)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:R, :R]
    skin = np.array([200, 150, 130], dtype=np.float64)
    images, healthy, masks = [], [], []
    for _ in range(n):
        base = skin + rng.normal(0, 6, (R, R, 3))
        cy, cx, r = rng.uniform(5, 11), rng.uniform(5, 11), rng.uniform(2.5, 4.5)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        lesion = base.copy()
        lesion[mask] = [90, 50, 40]
        images.append(lesion), healthy.append(base), masks.append(mask)
    to_u8 = lambda a: np.clip(np.stack(a), 0, 255).astype(np.uint8)  # noqa: E731
    return to_u8(images), to_u8(healthy), np.stack(masks)


def write_dataset(path, n=10):
    images, healthy, masks = synthetic_pairs(n)
    has_healthy = np.ones(n, bool)
    has_healthy[-1] = False
    with h5py.File(path, "w") as h5:
        g = h5.create_group("train")
        g["ids"] = np.array([f"ISIC_{i:07d}" for i in range(n)], dtype=h5py.string_dtype())
        g["images"], g["healthy"], g["masks"] = images, healthy, masks.astype(np.uint8)
        g["orig_size"] = np.full((n, 2), R, np.int32)
        g["has_healthy"] = has_healthy
        h5.attrs["resolution"] = R
    return path


def make_trainer(tmp_path, steps, name="run", model_cfg=None, stopping=None, clock=None, sample_batch=None,
                 **overrides):
    """A Trainer on tiny synthetic pairs, with files under tmp_path/name; overrides are TrainSettings fields."""
    torch.manual_seed(0)
    images, healthy, _ = synthetic_pairs(8)
    cfg = {**TINY_MODEL, **(model_cfg or {})}
    model = build_model(cfg, R)
    sampler = PairSampler(images, healthy, 8, PairedAugment(), cfg["class_dropout"], model.null_label)
    schedule = Schedule.from_config(DIFFUSION)
    out = tmp_path / name
    settings = TrainSettings(**{**TRAIN, "steps": steps, **overrides})
    files = RunFiles(out / "model.pt", out / "loss.csv", kind="ddpm", config={"model": cfg, "image_size": R})
    return Trainer(model, lambda m, batch, g: epsilon_loss(m, batch[0], batch[1], schedule, g), sample_batch or sampler,
                   settings, files, stopping=stopping, clock=clock or time.monotonic)


def assert_states_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_optimizer_equal(a, b):
    assert a["param_groups"] == b["param_groups"]
    for pid, state in a["state"].items():
        for k, v in state.items():
            assert torch.equal(v, b["state"][pid][k]), (pid, k)


# ----------------------------------------------------------------------------- DDPM end to end


def test_train_ddpm_lowers_loss_and_writes_outputs(tmp_path):
    h5 = write_dataset(tmp_path / "dataset.h5")
    ckpt, csv_path, png = tmp_path / "m" / "ddpm.pt", tmp_path / "m" / "loss.csv", tmp_path / "m" / "loss.png"
    train = TrainSettings(**{**TRAIN, "steps": 60, "checkpoint_every": 20, "log_every": 10})
    summary = train_ddpm(h5, ckpt, csv_path, png, model=TINY_MODEL, diffusion=DIFFUSION, augment={}, train=train)
    assert summary["steps"] == 60 and summary["pairs"] == 9 and summary["image_size"] == R
    rows = list(csv.DictReader(open(csv_path)))
    assert list(rows[0]) == ["step", "loss", "lr", "images_per_s"]
    assert [int(r["step"]) for r in rows] == [10, 20, 30, 40, 50, 60]
    losses = [float(r["loss"]) for r in rows]
    assert losses[0] > 0.5  # zero-initialised output: the first predictions are ~0, MSE ~1
    assert np.mean(losses[-2:]) < 0.7 * losses[0]
    assert float(rows[-1]["lr"]) == pytest.approx(2e-3)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not resume_path_for(ckpt).exists()
    model, cfg = load_model(ckpt, device="cpu")
    assert not model.training
    assert cfg["image_size"] == R and cfg["diffusion"]["T"] == 100 and cfg["model"]["base_channels"] == 16
    assert set(cfg) == {"model", "diffusion", "train", "augment", "image_size"}
    ema = load_checkpoint(ckpt)["ema"]
    assert_states_equal(model.state_dict(), ema)


def test_train_ddpm_rejects_unknown_keys_and_odd_batch(tmp_path):
    h5 = write_dataset(tmp_path / "dataset.h5")
    out = tmp_path / "x.pt"
    with pytest.raises(ValueError, match="config section 'train': stepz"):
        TrainSettings.from_config({"stepz": 3})
    with pytest.raises(ValueError, match="batch_size must be even"):
        train_ddpm(h5, out, tmp_path / "l.csv", tmp_path / "l.png", model=TINY_MODEL,
                   train=TrainSettings(**{**TRAIN, "batch_size": 7, "steps": 1}))


def test_epsilon_loss_uses_q_sample_with_drawn_t_and_noise():
    seen = {}

    def probe(x_t, t, y):
        seen.update(x_t=x_t, t=t)
        return torch.zeros_like(x_t)

    x0 = torch.rand(4, 3, R, R) * 2 - 1
    schedule = Schedule.from_config(DIFFUSION)
    abar = schedule.alpha_bar
    loss = epsilon_loss(probe, x0, torch.zeros(4, dtype=torch.long), schedule, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    t = torch.randint(0, 100, (4,), generator=g)
    noise = torch.empty_like(x0).normal_(generator=g)
    assert torch.equal(seen["t"], t) and int(t.max()) < 100
    assert torch.allclose(seen["x_t"], q_sample(x0, t, noise, abar))
    assert loss.item() == pytest.approx(noise.pow(2).mean().item(), rel=1e-6)


def test_pair_sampler_pairs_twins_and_drops_labels():
    lesion = np.repeat(np.arange(6, dtype=np.uint8)[:, None, None, None] * 20, 3, axis=3) * np.ones((1, 4, 4, 3), np.uint8)
    healthy = lesion + 5
    sampler = PairSampler(lesion, healthy, 8, augment=None)
    x0, y = sampler(0, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert x0.shape == (8, 3, 4, 4) and y.tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert torch.allclose(x0[4:] - x0[:4], torch.full((4, 3, 4, 4), 5 / 127.5), atol=1e-6)  # each twin beside its image
    assert float(x0.min()) >= -1 and float(x0.max()) <= 1
    dropping = PairSampler(lesion, healthy, 400, augment=None, class_dropout=0.5, null_label=2)
    _, y = dropping(0, torch.Generator().manual_seed(1), torch.device("cpu"))
    assert set(y.tolist()) == {0, 1, 2} and 150 < int((y == 2).sum()) < 250


# ----------------------------------------------------------------------------- the trainer's parts, each alone


def test_ema_update_is_the_decayed_average_and_copies_buffers():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = EMA(model, decay=0.9)
    before = {k: v.clone() for k, v in ema.model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.fill_(3.0)
    ema.update(model)
    for name, p in model.named_parameters():
        assert torch.allclose(ema.model.state_dict()[name], before[name] + 0.1 * (p - before[name]), atol=1e-6)
    assert torch.equal(ema.model[1].running_mean, torch.full((2,), 3.0))  # buffers are copied, not averaged
    assert not any(p.requires_grad for p in ema.model.parameters()) and not ema.model.training
    assert ema.final_state() is not None and ema.best is None
    ema.keep_best()
    best = {k: v.clone() for k, v in ema.best.items()}
    ema.update(model)  # a later update leaves the kept best unchanged
    assert_states_equal(ema.final_state(), best)
    assert not torch.equal(ema.model.state_dict()["0.weight"], best["0.weight"])


def test_early_stopping_counts_evaluations_without_improvement():
    stopping = EarlyStopping(lambda model: 0.0, every=3, patience=2)
    assert [stopping.due(step) for step in (1, 3, 4, 6)] == [False, True, False, True]
    assert [stopping.observe(m) for m in (0.5, 0.4, 0.6, 0.6)] == [True, False, True, False]  # a tie is no gain
    assert stopping.best == 0.6 and stopping.evals_since_best == 1 and not stopping.exhausted
    assert not stopping.observe(0.1) and stopping.exhausted
    lower = EarlyStopping(lambda model: 0.0, every=1, maximize=False)
    assert [lower.observe(m) for m in (0.5, 0.4, 0.7)] == [True, True, False] and lower.best == 0.4
    assert not lower.exhausted  # patience None: never stops early
    with pytest.raises(ValueError, match="evaluation every 0 steps"):
        EarlyStopping(lambda model: 0.0, every=0)


def test_time_budget_reads_the_clock_only_with_a_budget():
    budget = TimeBudget(1, clock=FakeClock(20.0))
    budget.start()  # 20 s
    assert [budget.spent() for _ in range(3)] == [False, False, True]  # 20, 40 then 60 s after the start
    clock = FakeClock(20.0)
    unlimited = TimeBudget(None, clock=clock)
    unlimited.start()
    assert not any(unlimited.spent() for _ in range(5)) and clock.now == 20.0  # one read, at the start
    for bad in (0, -1.5):
        with pytest.raises(ValueError, match=f"max_minutes must be a positive number.*{bad}"):
            TimeBudget(bad)


def checkpoint_state(files, step, weight_shape=(2,)):
    return {"model": {"w": torch.zeros(weight_shape)}, "ema": {"w": torch.ones(weight_shape)}, "optimizer": {},
            "scaler": None, "step": step, "config": files.config, "version": "test", "kind": files.kind,
            "best_metric": None}


def test_run_files_write_the_resume_file_the_final_checkpoint_and_the_csv(tmp_path):
    files = RunFiles(tmp_path / "m.pt", tmp_path / "log.csv", kind="ddpm", config={"model": {"w": 1}, "image_size": R})
    assert files.resume_path == resume_path_for(tmp_path / "m.pt") == tmp_path / "m.pt.resume.pt"
    assert files.load_resume("cpu", {"w": torch.zeros(2)}) is None
    assert files.kept_checkpoint_text() == f"no resume checkpoint was written yet ({files.resume_path})"
    files.save_resume(checkpoint_state(files, 4))
    assert files.kept_checkpoint_text().endswith("m.pt.resume.pt (step 4)")
    again = RunFiles(tmp_path / "m.pt", tmp_path / "log.csv", kind="ddpm", config={"model": {"w": 1}, "image_size": R})
    assert again.load_resume("cpu", {"w": torch.zeros(2)})["step"] == 4 and again.last_saved_step == 4
    rows = [{"step": 2, "loss": 0.5, "lr": 1e-3, "images_per_s": 10.0, "extra": "not a column"}]
    files.save_final(checkpoint_state(files, 6), rows, keep_resume=True)
    assert files.resume_path.exists() and load_checkpoint(tmp_path / "m.pt")["step"] == 6
    assert list(csv.DictReader(open(tmp_path / "log.csv"))) == [{"step": "2", "loss": "0.5", "lr": "0.001",
                                                                  "images_per_s": "10.0"}]
    files.save_final(checkpoint_state(files, 6), rows)
    assert not files.resume_path.exists()
    with pytest.raises(ValueError, match="resume_path must differ"):
        RunFiles(tmp_path / "m.pt", tmp_path / "log.csv", kind="ddpm", config={}, resume_path=tmp_path / "m.pt")


def test_run_files_refuse_a_resume_file_of_another_model(tmp_path):
    files = RunFiles(tmp_path / "m.pt", tmp_path / "log.csv", kind="ddpm", config={"model": {"w": 1}, "image_size": R})
    files.save_resume(checkpoint_state(files, 4))
    other_config = RunFiles(tmp_path / "m.pt", tmp_path / "l.csv", kind="ddpm", config={"model": {"w": 2},
                                                                                         "image_size": R})
    with pytest.raises(CheckpointError, match=r"m\.pt\.resume\.pt: resume file .*differs in \['model'\]"):
        other_config.load_resume("cpu", {"w": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="differs in parameter shapes"):
        files.load_resume("cpu", {"w": torch.zeros(3)})
    baseline = RunFiles(tmp_path / "m.pt", tmp_path / "l.csv", kind="baseline", config=files.config)
    with pytest.raises(CheckpointError, match="kind is 'ddpm', expected 'baseline'"):
        baseline.load_resume("cpu", {"w": torch.zeros(2)})


def test_train_settings_refuse_zero_steps_and_intervals():
    for bad in ({"steps": 0}, {"checkpoint_every": 0}, {"log_every": 0}):
        with pytest.raises(ValueError, match="steps, checkpoint_every and log_every must be >= 1"):
            TrainSettings(**bad)


# ----------------------------------------------------------------------------- the trainer


def test_warmup_then_constant_lr(tmp_path):
    trainer = make_trainer(tmp_path, 1, lr=1e-3, warmup_steps=4)
    assert [trainer.lr_at(s) for s in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def test_checkpoint_round_trip_restores_everything(tmp_path):
    trainer = make_trainer(tmp_path, 3)
    trainer.fit()
    ckpt = load_checkpoint(tmp_path / "run" / "model.pt", kind="ddpm")
    assert ckpt["step"] == 3 and ckpt["kind"] == "ddpm" and ckpt["config"]["model"]["base_channels"] == 16
    fresh = make_trainer(tmp_path, 3, name="fresh")
    save_checkpoint(tmp_path / "copy.pt", ckpt)
    fresh.files.resume_path = tmp_path / "copy.pt"
    fresh.resume()
    assert fresh.step == 3
    assert_states_equal(fresh.model.state_dict(), trainer.model.state_dict())
    assert_states_equal(fresh.ema.model.state_dict(), trainer.ema.model.state_dict())
    assert_optimizer_equal(fresh.optimizer.state_dict(), trainer.optimizer.state_dict())
    assert fresh.rows == trainer.rows


class Interrupt(Exception):
    pass


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    steps = 10
    reference = make_trainer(tmp_path, steps, name="ref")
    ref_summary = reference.fit()

    first = make_trainer(tmp_path, steps, name="int")
    sampler = first.sample_batch

    def crash_at_7(step, generator, device):
        if step == 7:
            raise Interrupt
        return sampler(step, generator, device)

    first.sample_batch = crash_at_7
    with pytest.raises(Interrupt):
        first.fit()
    resume = tmp_path / "int" / "model.pt.resume.pt"
    assert load_checkpoint(resume)["step"] == 4
    second = make_trainer(tmp_path, steps, name="int")
    summary = second.fit()
    assert summary["resumed_from"] == 4 and not resume.exists()
    a, b = load_checkpoint(tmp_path / "ref" / "model.pt"), load_checkpoint(tmp_path / "int" / "model.pt")
    assert_states_equal(a["model"], b["model"])
    assert_states_equal(a["ema"], b["ema"])
    assert_optimizer_equal(a["optimizer"], b["optimizer"])
    assert a["step"] == b["step"] == steps
    ref_rows = list(csv.DictReader(open(tmp_path / "ref" / "loss.csv")))
    int_rows = list(csv.DictReader(open(tmp_path / "int" / "loss.csv")))
    assert [(r["step"], r["loss"], r["lr"]) for r in ref_rows] == [(r["step"], r["loss"], r["lr"]) for r in int_rows]
    assert ref_summary["final_loss"] == summary["final_loss"]


def test_resume_with_different_model_is_refused(tmp_path):
    first = make_trainer(tmp_path, 4, name="r")
    first.fit()
    # a run of 4 steps leaves the final checkpoint; reuse it as another model's resume file
    (tmp_path / "r" / "model.pt").rename(tmp_path / "r" / "model.pt.resume.pt")
    other = make_trainer(tmp_path, 8, name="r", model_cfg={"base_channels": 8})
    with pytest.raises(CheckpointError, match=r"model\.pt\.resume\.pt.*different model"):
        other.fit()


def test_nan_loss_stops_and_keeps_last_resume_file(tmp_path):
    trainer = make_trainer(tmp_path, 12, name="nan")
    good_loss = trainer.loss_fn

    def nan_at_6(model, batch, generator):
        loss = good_loss(model, batch, generator)
        return loss * math.nan if trainer.step == 6 else loss

    trainer.loss_fn = nan_at_6
    with pytest.raises(RuntimeError, match=r"loss is nan at step 7.*model\.pt\.resume\.pt \(step 4\)"):
        trainer.fit()
    kept = load_checkpoint(tmp_path / "nan" / "model.pt.resume.pt")
    assert kept["step"] == 4
    assert all(torch.isfinite(v).all() for v in kept["model"].values())
    assert not (tmp_path / "nan" / "model.pt").exists()


def test_corrupt_or_foreign_checkpoints_are_named(tmp_path):
    trainer = make_trainer(tmp_path, 2)
    trainer.fit()
    good = (tmp_path / "run" / "model.pt").read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good[: len(good) // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    for path, problem in [(truncated, "corrupt or truncated"), (garbage, "not a torch checkpoint"),
                          (foreign, "missing keys"), (tmp_path / "absent.pt", "not found")]:
        with pytest.raises(CheckpointError, match=problem) as err:
            load_checkpoint(path)
        assert str(err.value).startswith(str(path))
    with pytest.raises(CheckpointError, match="kind is 'ddpm', expected 'unet'"):
        load_checkpoint(tmp_path / "run" / "model.pt", kind="unet")
    with pytest.raises(CheckpointError, match="truncated.pt"):
        load_model(truncated)


def test_early_stopping_keeps_best_ema(tmp_path):
    metrics = iter([0.5, 0.9, 0.7, 0.6, 0.95])
    snapshots = []

    def evaluate(ema_model):
        snapshots.append({k: v.clone() for k, v in ema_model.state_dict().items()})
        return next(metrics)

    trainer = make_trainer(tmp_path, 20, name="es", stopping=EarlyStopping(evaluate, 2, patience=2))
    summary = trainer.fit()
    assert summary["stopped_early"] and summary["steps"] == 8 and summary["best_metric"] == 0.9
    ckpt = load_checkpoint(tmp_path / "es" / "model.pt")
    assert ckpt["best_metric"] == 0.9
    assert_states_equal(ckpt["ema"], snapshots[1])


# ----------------------------------------------------------------------------- time budget (train.max_minutes)


class FakeClock:
    """Seconds that advance only when the training loop reads them: each read is `tick` seconds later."""

    def __init__(self, tick):
        self.now, self.tick = 0.0, tick

    def __call__(self):
        self.now += self.tick
        return self.now


def test_time_budget_stops_after_the_step_that_spends_it(tmp_path, caplog):
    # one read at the start, one after each step: 30 s per step, a 2-minute budget ends at step 4
    trainer = make_trainer(tmp_path, 10, name="tb", log_every=3, checkpoint_every=100,
                           max_minutes=2, clock=FakeClock(30.0))
    with caplog.at_level("INFO", logger="diffseg.train"):
        summary = trainer.fit()
    assert summary["steps"] == 4 and summary["steps_planned"] == 10 and summary["stopped_by"] == "max_minutes"
    assert not summary["stopped_early"]
    final = load_checkpoint(tmp_path / "tb" / "model.pt", kind="ddpm")
    assert final["step"] == 4 and final["steps_planned"] == 10 and final["stopped_by"] == "max_minutes"
    assert_states_equal(final["ema"], trainer.ema.model.state_dict())  # the EMA weights of the step reached
    rows = list(csv.DictReader(open(tmp_path / "tb" / "loss.csv")))
    assert [int(r["step"]) for r in rows] == [3, 4]  # the stop step is logged although not a log_every step
    resume = load_checkpoint(tmp_path / "tb" / "model.pt.resume.pt")
    assert resume["step"] == 4  # kept at the step reached, although checkpoint_every is 100
    assert "time budget of 2 min reached: training stopped at step 4 of 10" in caplog.text


def test_progress_bar_counts_steps_or_the_budget_seconds():
    from diffseg.train import advance_progress, progress_bar

    steps = progress_bar("train ddpm", 600, 200, None)  # resumed at step 200
    advance_progress(steps, 1e6, None)
    assert (steps.total, steps.n, steps.unit) == (600, 201, "step")
    steps.close()
    budget = progress_bar("train ddpm", 10**9, 0, 3)  # 3 minutes, a step bound that would take hours
    assert (budget.total, budget.n, budget.unit) == (180, 0, "s")
    advance_progress(budget, 30.4, 3)
    assert budget.n == pytest.approx(30.4) and "| 30/180 s [" in str(budget) and "3 min budget" in str(budget)
    advance_progress(budget, 200.0, 3)  # the step that spends the budget ends past it
    assert budget.n == 180 and "| 180/180 s [" in str(budget)
    budget.close()


def test_time_budget_bar_follows_the_trainers_clock(tmp_path, monkeypatch):
    import diffseg.train

    bars = []
    real = diffseg.train.progress_bar
    monkeypatch.setattr(diffseg.train, "progress_bar", lambda *args: bars.append(real(*args)) or bars[-1])
    make_trainer(tmp_path, 10, name="bar", max_minutes=1.5, clock=FakeClock(20.0)).fit()
    (bar,) = bars
    assert bar.total == 90 and bar.n == 90 and bar.unit == "s"  # 5 steps of 20 s: the last one ends at 100 s
    assert "step=5" in bar.postfix.split(", ")


def test_time_budget_then_rerun_continues_to_the_uninterrupted_weights(tmp_path):
    reference = make_trainer(tmp_path, 10, name="ref")
    reference.fit()
    budgeted = make_trainer(tmp_path, 10, name="b", max_minutes=1, clock=FakeClock(10.0))
    assert budgeted.fit()["steps"] == 6  # 60 s at 10 s per step
    # same steps, larger budget: continues from the kept resume file and ends with the same weights
    rerun = make_trainer(tmp_path, 10, name="b", max_minutes=10, clock=FakeClock(10.0))
    summary = rerun.fit()
    assert summary["resumed_from"] == 6 and summary["steps"] == 10 and summary["stopped_by"] is None
    assert not (tmp_path / "b" / "model.pt.resume.pt").exists()
    a, b = load_checkpoint(tmp_path / "ref" / "model.pt"), load_checkpoint(tmp_path / "b" / "model.pt")
    assert_states_equal(a["model"], b["model"])
    assert_states_equal(a["ema"], b["ema"])
    assert_optimizer_equal(a["optimizer"], b["optimizer"])
    assert b["step"] == 10 and b["stopped_by"] is None


def test_time_budget_that_outlasts_the_steps_changes_nothing(tmp_path):
    trainer = make_trainer(tmp_path, 5, name="long", max_minutes=60, clock=FakeClock(1.0))
    summary = trainer.fit()
    assert summary["steps"] == 5 and summary["stopped_by"] is None
    assert not (tmp_path / "long" / "model.pt.resume.pt").exists()


def test_time_budget_with_early_stopping_keeps_best_evaluated_ema(tmp_path):
    metrics = iter([0.5, 0.9, 0.7])
    snapshots = []

    def evaluate(ema_model):
        snapshots.append({k: v.clone() for k, v in ema_model.state_dict().items()})
        return next(metrics)

    # evaluations at steps 2, 4, 6; the budget (7 reads of 10 s after the start) ends at step 7
    trainer = make_trainer(tmp_path, 20, name="tbe", stopping=EarlyStopping(evaluate, 2, patience=5),
                           max_minutes=70 / 60, clock=FakeClock(10.0))
    summary = trainer.fit()
    assert summary["steps"] == 7 and summary["stopped_by"] == "max_minutes" and summary["best_metric"] == 0.9
    assert_states_equal(load_checkpoint(tmp_path / "tbe" / "model.pt")["ema"], snapshots[1])
    resume = load_checkpoint(tmp_path / "tbe" / "model.pt.resume.pt")
    assert resume["step"] == 7 and resume["trainer_state"]["evals_since_best"] == 1


def test_time_budget_must_be_positive(tmp_path):
    for bad in (0, -1.5):
        with pytest.raises(ValueError, match=f"max_minutes must be a positive number.*{bad}"):
            make_trainer(tmp_path, 3, max_minutes=bad)


def test_train_ddpm_passes_the_time_budget(tmp_path):
    # a real clock and a budget far below one step's time: training stops after its first step
    h5 = write_dataset(tmp_path / "dataset.h5")
    ckpt = tmp_path / "m" / "ddpm.pt"
    train = TrainSettings(**{**TRAIN, "steps": 50, "max_minutes": 1e-9})
    summary = train_ddpm(h5, ckpt, tmp_path / "m" / "l.csv", tmp_path / "m" / "l.png", model=TINY_MODEL,
                         diffusion=DIFFUSION, augment={}, train=train)
    assert summary["steps"] == 1 and summary["stopped_by"] == "max_minutes"
    assert load_checkpoint(ckpt)["config"]["train"]["max_minutes"] == 1e-9
    assert load_checkpoint(resume_path_for(ckpt))["step"] == 1


class _Zeros(torch.nn.Module):
    """Predicts zero noise; records the timesteps and labels it was called with."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append((t.clone(), y.clone()))
        return torch.zeros_like(x)


class _Oracle(torch.nn.Module):
    """Knows the clean image x0: returns the exact noise (x_t - sqrt(a_t) x0) / sqrt(1 - a_t)."""

    def __init__(self, x0, schedule):
        super().__init__()
        self.x0, self.schedule = x0, schedule

    def forward(self, x, t, y):
        a = self.schedule.alpha_bar[t].reshape(-1, 1, 1, 1)
        return (x - a.sqrt() * self.x0) / (1 - a).sqrt()


def _seeded_noise(images, seed):
    from diffseg.seeding import content_key, image_generator

    return torch.stack([torch.randn((3, R, R), generator=image_generator(seed, content_key(im))) for im in images])


def test_val_epsilon_loss_of_a_zero_model_is_the_mean_square_of_the_seeded_noise():
    from diffseg.ddpm import val_epsilon_loss

    images, _, _ = synthetic_pairs(4)
    schedule = Schedule.from_config(DIFFUSION)
    model = _Zeros()
    loss = val_epsilon_loss(model, schedule, images, t=40, label=1, seed=5, batch_images=3)
    assert loss == pytest.approx(_seeded_noise(images, 5).square().mean().item(), rel=1e-6)
    assert abs(loss - 1.0) < 0.1  # 3,072 squared standard normals
    assert [len(t) for t, _ in model.calls] == [3, 1]  # two batches
    assert all((t == 40).all() and (y == 1).all() for t, y in model.calls)
    assert val_epsilon_loss(model, schedule, images, t=40, label=1, seed=6) != loss  # another seed, other noise


def test_val_epsilon_loss_is_zero_for_the_exact_noise_and_independent_of_order_and_batch():
    from diffseg.ddpm import val_epsilon_loss

    images = np.repeat(synthetic_pairs(1)[0], 3, axis=0)  # one image three times: one x0 for the oracle
    schedule = Schedule.from_config(DIFFUSION)
    x0 = torch.from_numpy(images[:1]).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert val_epsilon_loss(_Oracle(x0, schedule), schedule, images, t=99, label=0, seed=0) < 1e-8
    model = build_model(TINY_MODEL, R).eval()
    many, _, _ = synthetic_pairs(5)
    whole = val_epsilon_loss(model, schedule, many, t=10, label=1, seed=0)
    assert val_epsilon_loss(model, schedule, many[::-1], t=10, label=1, seed=0, batch_images=2) == pytest.approx(
        whole, rel=1e-5)
    assert val_epsilon_loss(model, schedule, many, t=10, label=1, seed=0) == whole  # deterministic
    assert math.isfinite(whole) and whole > 0


def test_val_epsilon_loss_names_a_bad_timestep_or_image_array():
    from diffseg.ddpm import val_epsilon_loss

    images, _, _ = synthetic_pairs(2)
    schedule = Schedule.from_config(DIFFUSION)
    with pytest.raises(ValueError, match=r"t = 100 outside \[0, 100\)"):
        val_epsilon_loss(_Zeros(), schedule, images, t=100, label=1, seed=0)
    with pytest.raises(ValueError, match="uint8 \\(N, H, W, 3\\)"):
        val_epsilon_loss(_Zeros(), schedule, images.astype(np.float32), t=1, label=1, seed=0)
