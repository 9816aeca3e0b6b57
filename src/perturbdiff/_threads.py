"""How many CPU threads torch uses: fixed, or chosen by timing the real work ("auto").

On a machine of one's own two OpenMP threads are fastest, but on a shared, loaded one two *spinning* threads fall off
a cliff (every op ends at a barrier where one thread waits for a descheduled partner): 2–25× slower than one thread
(docs/PERFORMANCE.md, "Threads"). No fixed count is within 1.3× of the best in both cases, so ``auto`` times a
few calls of the work itself (a training step's forward + backward, one sampler step) at 1 and at all cores,
interleaved, and keeps the fewest threads within 10 % of the fastest. Training measures again at its checkpoints (at
most once a minute: a load that arrives later is caught) and records the count in the checkpoint, so a resumed run
continues with it.

The policy is process-wide: ``set_threads`` (the command line's ``--threads``) sets it; without a call torch's own
setting is left alone. ``OMP_NUM_THREADS`` in the environment is the user's choice and ``auto`` keeps it.
A fixed count makes a run reproducible bit for bit (the count changes the order of floating-point sums).
torch is imported only where a count is set or timed, so the command line parses ``--threads`` without it.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Callable

from perturbdiff._errors import ConfigError
from perturbdiff._logging import logger

AUTO = "auto"
#: the fewest threads within this factor of the fastest count is chosen (fewer threads ride out load spikes)
TOLERANCE = 1.10
#: a choice is measured again only after this many seconds (each checkpoint of a long run; once a minute for tiny)
MAX_AGE_S = 60.0
_POLICY: dict = {"spec": None, "said": None, "choices": {}}


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def parse_threads(value) -> str | int | None:
    """``"auto"``, a positive count, or None (leave torch alone); a ConfigError names anything else."""
    if value is None or value == AUTO:
        return value
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit() or int(text) < 1:
        raise ConfigError(f"threads must be 'auto' or a whole number >= 1, got {value!r}")
    return int(text)


def set_threads(spec: str | int | None) -> None:
    """Set the process's thread policy: a count (applied now), ``"auto"`` (measured where work starts), or None."""
    import torch

    spec = parse_threads(spec)
    _POLICY.update(spec=spec, said=None, choices={})
    if isinstance(spec, int):
        torch.set_num_threads(spec)
        logger.info("threads: %d (--threads)", spec)


def auto_active(device="cpu") -> bool:
    """Whether ``auto`` has something to measure here: the policy is auto, the work runs on the CPU, the user has
    not fixed OMP_NUM_THREADS, and there is more than one core."""
    import torch

    if _POLICY["spec"] != AUTO or torch.device(device).type != "cpu":
        return False
    if os.environ.get("OMP_NUM_THREADS"):
        if _POLICY["said"] != "env":
            logger.info("threads: %d (OMP_NUM_THREADS)", torch.get_num_threads())
            _POLICY["said"] = "env"
        return False
    return cpu_cores() > 1


def candidates(cores: int | None = None) -> list[int]:
    """Counts worth timing: 1, half the cores (from 4 on) and all of them."""
    n = cores or cpu_cores()
    return sorted({1, max(1, n // 2) if n >= 4 else 1, n})


def time_counts(work: Callable[[], object], counts: list[int], rounds: int = 2) -> dict[int, float]:
    """Median seconds of ``work()`` per thread count: one untimed call, one warm-up call each, then ``rounds``
    interleaved rounds (so a change of load hits every count alike). A count whose warm-up took over 3× the fastest
    warm-up is not timed further (the cliff is plain; its warm-up time stands). Leaves torch at the last count
    timed."""
    import torch

    work()  # the first call of all pays for allocations and caches: not counted against any count
    warm: dict[int, float] = {}
    for n in counts:
        torch.set_num_threads(n)
        t = time.perf_counter()
        work()
        warm[n] = time.perf_counter() - t
    times: dict[int, list[float]] = {n: [warm[n]] for n in counts}
    timed = [n for n in counts if warm[n] <= 3 * min(warm.values())]
    for _ in range(rounds):
        for n in timed:
            torch.set_num_threads(n)
            t = time.perf_counter()
            work()
            times[n].append(time.perf_counter() - t)
    return {n: statistics.median(ts[1:]) if len(ts) > 1 else ts[0] for n, ts in times.items()}


def fewest_within(seconds: dict[int, float], tolerance: float = TOLERANCE) -> int:
    """The smallest count whose time is within ``tolerance`` of the fastest."""
    best = min(seconds.values())
    return min(n for n, s in seconds.items() if s <= tolerance * best)


def calibrate(work: Callable[[], object], what: str, *, counts: list[int] | None = None, rounds: int = 2,
              max_age: float = MAX_AGE_S) -> int:
    """Time ``work`` at each candidate count, set torch to the chosen one and say it in one log line; a choice for
    the same ``what`` made less than ``max_age`` seconds ago is reused without timing (small models check often)."""
    import torch

    last = _POLICY["choices"].get(what)
    if last is not None and time.monotonic() - last[1] < max_age:
        torch.set_num_threads(last[0])
        return last[0]
    seconds = time_counts(work, counts or candidates(), rounds)
    chosen = fewest_within(seconds)
    torch.set_num_threads(chosen)
    measured = ", ".join(f"{n} → {s * 1e3:.0f} ms" for n, s in sorted(seconds.items()))
    message = f"threads: {chosen} of {cpu_cores()} cores (auto, {what}: {measured}; --threads N fixes it)"
    # a change is news; the same choice again only under -v
    logger.log(logging.INFO if last is None or last[0] != chosen else logging.DEBUG, message)
    _POLICY["choices"][what] = (chosen, time.monotonic())
    return chosen
