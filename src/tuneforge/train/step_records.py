"""What the loop records about its steps in the run's TrainState: the loss (first, last, spikes), steps whose
loss or gradient was not finite (stopping after train.max_bad_steps), and evaluations (the best metric and
early stopping)."""

from __future__ import annotations

from pathlib import Path

from tuneforge.config.schema import EvalConfig, TrainConfig
from tuneforge.train.checkpoint import TrainState, find_latest
from tuneforge.train.monitor import Monitor
from tuneforge.train.signals import BadStepsError


def track_loss(st: TrainState, cfg: TrainConfig, monitor: Monitor, step: int, loss: float, spikes: bool = True) -> None:
    """First and last loss; a spike (loss over train.loss_spike_factor x its recent average) is logged where
    `spikes`: not for GRPO, whose loss is a policy-gradient surrogate around 0, so a ratio to its average says
    nothing."""
    factor = cfg.loss_spike_factor if spikes else None
    if st.first_loss is None:
        st.first_loss = loss
    st.last_loss = loss
    if factor and st.loss_avg is not None and step > 10 and loss > factor * st.loss_avg:
        monitor.write({"type": "loss_spike", "step": step, "loss": loss, "recent_avg": st.loss_avg})
        monitor.event(f"loss spike at step {step}: {loss:.4g} vs a recent average of {st.loss_avg:.4g}")
    st.loss_avg = loss if st.loss_avg is None else 0.9 * st.loss_avg + 0.1 * loss


def record_bad_step(st: TrainState, cfg: TrainConfig, monitor: Monitor, step: int, m: dict, ckpt_root: Path) -> None:
    """Count a skipped step; raise BadStepsError once more than train.max_bad_steps were skipped."""
    st.bad_steps += 1
    monitor.write(
        {"type": "bad_step", "step": step, "loss": m["loss"], "grad_norm": m["grad_norm"], "bad_steps": st.bad_steps}
    )
    monitor.event(
        f"step {step}: non-finite loss {m['loss']} / grad norm {m['grad_norm']}; skipped "
        f"(no weight update), {st.bad_steps} so far (limit train.max_bad_steps={cfg.max_bad_steps})"
    )
    if st.bad_steps > cfg.max_bad_steps:
        latest = find_latest(ckpt_root)
        raise BadStepsError(
            f"stopped at step {step}: {st.bad_steps} steps had a non-finite loss or gradient (more than "
            f"train.max_bad_steps={cfg.max_bad_steps}). "
            + (f"The last good checkpoint is {latest}. " if latest else "No checkpoint was written yet. ")
            + "Lower train.lr, keep train.max_grad_norm set, or check the data (tuneforge data preview)."
        )


def record_eval(st: TrainState, ev: EvalConfig, step: int, result: dict) -> bool:
    """Keep the evaluation and the best/early-stop bookkeeping; True when this is a new best."""
    st.last_eval = {"step": step, **result}
    value = result.get(ev.metric)
    if value is None:
        return False
    sign = 1.0 if ev.higher_is_better else -1.0
    if st.best_metric is None or sign * (value - st.best_metric) > ev.early_stopping_min_delta:
        st.best_metric, st.best_step, st.evals_without_improvement = value, step, 0
        return True
    st.evals_without_improvement += 1
    return False


def should_stop_early(st: TrainState, ev: EvalConfig) -> bool:
    return bool(ev.early_stopping_patience) and st.evals_without_improvement >= ev.early_stopping_patience
