"""ODE samplers over t in [0, 1] as plain functions (k-diffusion's habit): ``field(x, t) -> (velocity, x̂1)``.

The field of an endpoint-predicting flow is singular at t = 1, so every solver ends by taking the last x̂1: with a
perfect endpoint predictor each one returns x1 exactly. ``euler`` and ``heun`` step on a uniform grid; ``odeint``
hands the field to torchdiffeq (adaptive ``dopri5`` or fixed-step ``rk4``) up to the last grid point.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Field = Callable[[torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]


def time_grid(steps: int) -> list[float]:
    """The start times of ``steps`` equal steps from 0 to 1: 0, 1/steps, ..., (steps − 1)/steps."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return [i / steps for i in range(steps)]


def euler(field: Field, x: torch.Tensor, steps: int) -> tuple[torch.Tensor, int]:
    """Explicit Euler; returns the last endpoint estimate and the number of field evaluations (= steps)."""
    ts = time_grid(steps)
    for t, t_next in zip(ts, ts[1:]):
        x = x + (t_next - t) * field(x, t)[0]
    return field(x, ts[-1])[1], steps


def heun(field: Field, x: torch.Tensor, steps: int) -> tuple[torch.Tensor, int]:
    """Heun's second-order method (the trapezoid predictor-corrector); the last step is Euler's, ending at x̂1.
    Evaluations: 2·steps − 1."""
    ts = time_grid(steps)
    for t, t_next in zip(ts, ts[1:]):
        dt, v = t_next - t, field(x, t)[0]
        x = x + dt * 0.5 * (v + field(x + dt * v, t_next)[0])
    return field(x, ts[-1])[1], 2 * steps - 1


def odeint(field: Field, x: torch.Tensor, steps: int, method: str = "dopri5", rtol: float = 1e-3,
           atol: float = 1e-4) -> tuple[torch.Tensor, int]:
    """torchdiffeq's solver from t = 0 to the last grid point, then one evaluation there for x̂1."""
    from torchdiffeq import odeint as solve

    ts = time_grid(steps)
    count = [0]

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        count[0] += 1
        return field(y, float(t))[0]

    end = torch.tensor([0.0, ts[-1]], dtype=torch.float64)
    options = {"step_size": ts[1] - ts[0]} if method == "rk4" and len(ts) > 1 else None
    if len(ts) > 1:
        x = solve(f, x, end, method=method, rtol=rtol, atol=atol, options=options)[-1]
    _, x1 = field(x, ts[-1])
    return x1, count[0] + 1


#: network evaluations of the fixed-step solvers for n steps
EVALUATIONS: dict[str, Callable[[int], int]] = {"euler": lambda n: n, "heun": lambda n: 2 * n - 1,
                                               "rk4": lambda n: 4 * (n - 1) + 1}

SOLVERS: dict[str, Callable[..., tuple[torch.Tensor, int]]] = {
    "euler": euler, "heun": heun,
    "dopri5": lambda f, x, s: odeint(f, x, s, "dopri5"), "rk4": lambda f, x, s: odeint(f, x, s, "rk4"),
}
