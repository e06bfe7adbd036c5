"""The learning rate of every optimizer step, a pure function of the position in training.

No torch LRScheduler: its state would have to travel in the checkpoint, and a resume would
depend on it. Here the rate of a step follows from the step's number and the run's length alone
(the global step job/progress.py keeps, train.epochs x steps per epoch), so a run resumed from
any checkpoint takes exactly the steps an uninterrupted one takes, bit for bit.
"""

from __future__ import annotations

from job.config import OptimConfig


def learning_rate(optim: OptimConfig, step: int, total_steps: int) -> float:
    """The learning rate of the optimizer step taken after `step` steps (0-based), of `total_steps`.

    constant: optim.lr. onecycle: the linear one-cycle policy (Smith and Topin 2019, "Super-
    Convergence", section 3; torch's OneCycleLR with anneal_strategy="linear", three_phase=False,
    without its momentum cycling): over the first W = round(optim.warmup x total_steps) steps the
    rate rises linearly to optim.lr (lr x (step + 1) / W), then falls linearly to lr / (total - W)
    at the last step (lr x (total - step) / (total - W)); every rate is above 0. ValueError for a
    step outside [0, total_steps).
    """
    if not 0 <= step < total_steps:
        raise ValueError(f"step {step} is outside the run's {total_steps} steps")
    if optim.schedule == "constant":
        return optim.lr
    warmup_steps = round(optim.warmup * total_steps)
    if step < warmup_steps:
        return optim.lr * (step + 1) / warmup_steps
    return optim.lr * (total_steps - step) / (total_steps - warmup_steps)
