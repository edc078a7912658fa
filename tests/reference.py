"""An independent float64 AdamHD, written from the update rule with numpy (no code shared with the package):
Adam's moments and bias corrections, δ = c · EMA of each layer's mean |θ|, then the decoupled Huber decay."""

from __future__ import annotations

import numpy as np


class RefAdamHD:
    """One optimizer over a list of float64 arrays; each array is one layer."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, delta_mode="ema",
                 delta_scale=1.5, delta_beta=0.99, delta=None, decay="prox", bias_correction=True):
        self.params = [np.array(p, dtype=np.float64) for p in params]
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.mode, self.c, self.bd, self.delta = delta_mode, delta_scale, delta_beta, delta
        self.decay, self.bc = decay, bias_correction
        self.m = [np.zeros_like(p) for p in self.params]
        self.v = [np.zeros_like(p) for p in self.params]
        self.mu = [None] * len(self.params)
        self.t = [0] * len(self.params)
        self.deltas = [None] * len(self.params)

    def _delta(self, i):
        th = self.params[i]
        if self.mode == "constant":
            return self.delta
        s = np.abs(th).sum() / th.size
        if self.mode == "mean_abs":
            return self.c * s
        self.mu[i] = s if self.mu[i] is None else self.bd * self.mu[i] + (1 - self.bd) * s
        return self.c * self.mu[i]

    def step(self, grads, lr=None):
        lr = self.lr if lr is None else lr
        tau = lr * self.wd
        for i, g in enumerate(grads):
            if g is None:
                continue
            g = np.asarray(g, dtype=np.float64)
            th = self.params[i]
            delta = self._delta(i) if self.wd != 0 else None
            self.deltas[i] = delta
            self.t[i] += 1
            t = self.t[i]
            self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * g
            self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * g * g
            mh = self.m[i] / (1 - self.b1 ** t) if self.bc else self.m[i]
            vh = self.v[i] / (1 - self.b2 ** t) if self.bc else self.v[i]
            u = mh / (np.sqrt(vh) + self.eps)
            if self.wd == 0:
                self.params[i] = th - lr * u
            elif self.decay == "prox":
                tilde = th - lr * u
                quad = np.abs(tilde) <= (1 + tau) * delta
                with np.errstate(invalid="ignore"):
                    lin = tilde - tau * delta * np.sign(tilde)
                self.params[i] = np.where(quad, tilde / (1 + tau), lin)
            else:  # clip
                self.params[i] = th - tau * np.clip(th, -delta, delta) - lr * u
