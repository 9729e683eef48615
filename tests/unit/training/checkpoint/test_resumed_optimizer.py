"""A resumed optimizer takes this run's learning rate, betas, eps and weight decay: torch restores the
checkpoint's param groups and LambdaLR its base_lrs, so a new optimizer.lr was ignored silently."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from torchtitan_runai.training.checkpoint.manager import apply_optimizer_settings


def build(lr: float, wd: float = 0.1):
    param = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([param], lr=lr, weight_decay=wd)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 5))
    return param, opt, sched


def test_a_new_learning_rate_applies_from_the_resumed_step():
    param, opt, sched = build(8e-4)
    for _ in range(6):
        param.grad = torch.ones(4)
        opt.step()
        sched.step()
    saved = (opt.state_dict(), sched.state_dict())
    _, opt2, sched2 = build(4e-4, wd=0.0)
    opt2.load_state_dict(saved[0])
    sched2.load_state_dict(saved[1])
    assert opt2.param_groups[0]["lr"] == 8e-4  # what torch alone resumes with: the checkpoint's
    config = SimpleNamespace(optimizer=SimpleNamespace(lr=4e-4, beta1=0.8, beta2=0.9, eps=1e-6, weight_decay=0.0))
    apply_optimizer_settings(SimpleNamespace(optimizers=[opt2]), SimpleNamespace(schedulers=[sched2]), config)
    group = opt2.param_groups[0]
    assert group["lr"] == 4e-4 and sched2.get_last_lr() == [4e-4] and sched2.base_lrs == [4e-4]
    assert group["betas"] == (0.8, 0.9) and group["eps"] == 1e-6 and group["weight_decay"] == 0.0
    assert opt2.state[opt2.param_groups[0]["params"][0]]["step"] == 6  # the moments stay the checkpoint's
    sched2.step()
    assert group["lr"] == 4e-4  # and the schedule goes on from the new peak
