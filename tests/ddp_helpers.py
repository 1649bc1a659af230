"""Helpers shared by the DDPNOpt and DGNOpt tests: tiny batches, one training step, the base
optimizers as torch (or SNOpt) implement them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ocnode.optim import SNOpt

F64 = torch.float64


def _batch(seed, n=4, d=4, classes=3, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randint(0, classes, (n,),
                                                                      generator=g)


def _step(model, opt, x, y):
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return float(loss.detach())


def _reference(base, model, hp):
    """The base optimizer as torch (or SNOpt, for EKFAC) implements it."""
    params = model.parameters()
    if base == "sgd":
        return torch.optim.SGD(params, **hp)
    if base == "rmsprop":
        return torch.optim.RMSprop(params, **hp)
    if base == "adam":
        return torch.optim.Adam(params, **hp)
    return SNOpt(model, lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"],
                 eps=hp["eps_ekfac"], alpha=hp["alpha"], update_freq=100, full=True)


def _toy(seed=0, n=64, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g, dtype=dtype)
    return x, (x[:, 0] + x[:, 1] > 0).long() + 2 * (x[:, 2] > 0).long()


def _train(model, opt, steps, seed=0, batch=16, sched=None):
    x, y = _toy(seed, dtype=next(model.parameters()).dtype)
    losses = []
    for k in range(steps):
        i = (k * batch) % len(x)
        losses.append(_step(model, opt, x[i:i + batch], y[i:i + batch]))
        if sched is not None:
            sched.step()
    return losses
