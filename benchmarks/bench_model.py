"""Speed of the denoiser on this CPU: training and DDIM sampling throughput, peak memory, parameters and MFU.

    python benchmarks/bench_model.py [--presets tiny,small,medium] [--threads 1,2] [--out FILE.json]
                                     [--omp-wait-policy passive] [--plot docs/figures/scaling_small.png]

About 7 minutes on a loaded 2-core CPU; tables go to stdout (markdown), progress to stderr.

Every preset runs in its own subprocess (so ru_maxrss peaks are separate) at G genes and B sets of the preset's
set size S, on random model-space data. Thread counts are interleaved inside each subprocess (round r: 1 thread,
2 threads, ...), and each subprocess measures its own fp32 matmul peak, so MFU is against the machine's state at
that time. Training = `Trainer.train_step` (training_loss with self-conditioning + energy distance, backward,
clip, AdamW, EMA). Model FLOPs per step = 4 × forward (forward + backward ≈ 3 forwards, + the no-grad
self-conditioning forward); a forward counts 2·m·n·k per Linear and 4·S²·d per head and layer of attention.
Sampling calls the process's `sample` (DDIM); where a full call would exceed the time budget, a shortened call of the
same sampler (k network evaluations) is timed and scaled to the full count (cost per evaluation does not depend on t).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from perturbdiff.config import Config, ModelConfig, SampleConfig
from perturbdiff.diffusion import make_process
from perturbdiff.nn import Denoiser, count_parameters
from perturbdiff.train import Trainer

VOCAB_SIZES = {"pert": 64, "contexts": [16], "batch": 8, "dose": 1}
SCALING_S = (16, 32, 64, 128, 256)
SCALING_G = (500, 1000, 2000)


# -- analytic FLOPs -----------------------------------------------------------------------------------------------
def forward_flops(m: ModelConfig, n_genes: int, n_sets: int, set_size: int) -> dict[str, float]:
    """FLOPs of one Denoiser forward by component: 2·m·n·k per Linear, 4·S²·d per head and layer of attention."""
    h, g, tok, d = m.hidden, n_genes, n_sets * set_size, m.depth
    inner = int(h * m.mlp_ratio)
    cov_in = m.cov_dim * (2 + len(VOCAB_SIZES["contexts"]))
    return {
        "input": 2 * tok * (2 * g * h + g * h),  # x_in (2G -> H) and ctrl_in (G -> H)
        "attn_linear": d * 2 * tok * (2 * h * 6 * h + 2 * h * 2 * h),  # qkv 2H -> 6H, proj 2H -> 2H
        "attn_scores": d * n_sets * 4 * set_size**2 * 2 * h,  # QK^T and AV: 4·S²·(2H/heads) per head
        "mlp": d * 2 * 2 * tok * 2 * h * inner,  # two streams, fc1 + fc2
        "output": 2 * tok * h * g,  # final Linear H -> G
        "conditioning": 2 * n_sets * (256 * h + h * h + cov_in * h + h * h + d * 2 * h * 6 * h + h * 2 * h),
    }


def step_flops(m: ModelConfig, n_genes: int, n_sets: int, set_size: int) -> dict[str, float]:
    """Model FLOPs of a training step (4 forwards) and the energy distance's (3 S×S×G matmuls forward, 3 backward)."""
    fwd = sum(forward_flops(m, n_genes, n_sets, set_size).values())
    return {"forward": fwd, "model_step": 4 * fwd, "ed_step": n_sets * 6 * 2 * set_size**2 * n_genes}


# -- set-up ----------------------------------------------------------------------------------------------------
def make_batch(n_sets: int, set_size: int, n_genes: int) -> dict[str, torch.Tensor]:
    """A loader-shaped batch of random sparse-ish model-space data (speed does not depend on the values)."""
    shape = (n_sets, set_size, n_genes)
    return {
        "target": (torch.randn(shape) - 0.5).clamp_min(0.0) * 0.3,  # (B, S, G)
        "control": (torch.randn(shape) - 0.5).clamp_min(0.0) * 0.3,  # (B, S, G)
        "pad": torch.zeros(n_sets, set_size, dtype=torch.bool),
        "pert": torch.randint(3, VOCAB_SIZES["pert"], (n_sets, 1)),
        "context": torch.randint(1, VOCAB_SIZES["contexts"][0], (n_sets, 1)),
        "batch": torch.randint(1, VOCAB_SIZES["batch"], (n_sets,)),
        "dose": torch.zeros(n_sets, dtype=torch.long),
        "cond": torch.arange(n_sets),
    }


def make_trainer(cfg: Config, n_genes: int) -> Trainer:
    """The real training step: Denoiser + Trainer (AdamW groups, clip, EMA) without a data set."""
    torch.manual_seed(0)
    return Trainer(Denoiser(cfg.model, n_genes, VOCAB_SIZES), make_process(cfg.diffusion), None, cfg, meta=dict)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def interleaved(fn: Callable[[int], Callable[[], object]], threads: list[int], rounds: int, budget: float,
                warmup: int = 1) -> dict[int, list[float]]:
    """Seconds per call of fn(th)() for each thread count, rounds interleaved; stops after 2 rounds past budget."""
    calls = {th: fn(th) for th in threads}
    for th in threads:
        torch.set_num_threads(th)
        for _ in range(warmup):
            calls[th]()
    times: dict[int, list[float]] = {th: [] for th in threads}
    start = time.perf_counter()
    for r in range(rounds):
        for th in threads:
            torch.set_num_threads(th)
            t = time.perf_counter()
            calls[th]()
            times[th].append(time.perf_counter() - t)
        if r >= 1 and time.perf_counter() - start > budget:
            break
    return times


def matmul_peak(threads: list[int], n: int = 2048, rounds: int = 3) -> dict[int, float]:
    """fp32 matmul peak (GFLOP/s) of n×n @ n×n per thread count: best of `rounds` interleaved repeats."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    times = interleaved(lambda th: lambda: torch.matmul(a, b), threads, rounds, budget=1e9)
    return {th: 2 * n**3 / min(ts) / 1e9 for th, ts in times.items()}


# -- measurements ----------------------------------------------------------------------------------------------
def bench_train(trainer: Trainer, batch: dict, threads: list[int], args) -> dict[int, dict]:
    """Median seconds per optimiser step per thread count (after warm-up steps)."""
    batches = itertools.repeat(batch)
    times = interleaved(lambda th: lambda: trainer.train_step(batches), threads, args.rounds, args.seconds,
                        warmup=args.warmup)
    return {th: {"step_s": statistics.median(ts), "n_timed": len(ts)} for th, ts in times.items()}


def sampler_modes(cfg: Config) -> list[dict]:
    """The default sampler (config defaults), a 50-step DDIM from t = T−1, and the default with guidance w = 1."""
    d = cfg.sample
    default = {"start": d.start, "steps": d.steps, "guidance": d.guidance}
    return [
        {"name": f"{d.start} (default), w={d.guidance:g}", **default},
        {"name": "full, 50 steps, w=0", "start": "full", "steps": 50, "guidance": 0.0},
        {"name": f"{d.start}, w=1", **default, "guidance": 1.0},
    ]


def _sample_fn(net, process, batch: dict, mode: dict, evals: int, start_t: int) -> Callable[[], object]:
    """A process.sample call of `mode` shortened to `evals` network evaluations."""
    cov = {k: batch[k] for k in ("pert", "context", "batch", "dose")}
    if mode["start"] == "truncated":
        settings = SampleConfig(start="truncated", truncated_start_t=min(start_t, evals - 1), guidance=mode["guidance"])
    else:
        settings = SampleConfig(start="full", steps=evals, guidance=mode["guidance"])
    gen = torch.Generator().manual_seed(0)
    return lambda: process.sample(net, batch["control"], cov, settings, generator=gen)


def bench_sample(net, cfg: Config, batch: dict, threads: list[int], args) -> list[dict]:
    """Seconds per full process.sample call per mode and thread count, from the evaluations that fit the budget."""
    process = make_process(cfg.diffusion)
    start_t = cfg.sample.truncated_start_t
    out = []
    for mode in sampler_modes(cfg):
        n_evals = len(process.timesteps(SampleConfig(steps=mode["steps"], start=mode["start"],
                                                     truncated_start_t=start_t)))
        probe = interleaved(lambda th, m=mode: _sample_fn(net, process, batch, m, 2, start_t), threads, 1, 0.0,
                            warmup=0)
        k = {th: min(n_evals, max(2, int(args.sample_seconds / args.rounds / (ts[0] / 2)))) for th, ts in
             probe.items()}
        times = interleaved(lambda th, m=mode, k=k: _sample_fn(net, process, batch, m, k[th], start_t), threads,
                            args.rounds, args.sample_seconds, warmup=0)
        for th, ts in times.items():
            per_eval = statistics.median(ts) / k[th]
            out.append({**mode, "threads": th, "evals": n_evals, "evals_timed": k[th], "n_timed": len(ts),
                        "call_s": per_eval * n_evals})
    return out


def profile_step(trainer: Trainer, batch: dict, top: int = 8) -> list[dict]:
    """Self CPU time of the most expensive ops in one training step (torch.profiler)."""
    batches = itertools.repeat(batch)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        trainer.train_step(batches)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [{"op": e.key, "ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total}
            for e in events[:top]]


def counted_flops(trainer: Trainer, batch: dict) -> dict[str, float]:
    """FLOPs of one forward and one training step as counted by torch.utils.flop_counter (a check of the model)."""
    from torch.utils.flop_counter import FlopCounterMode

    net, b = trainer.net, batch
    cov = {k: b[k] for k in ("pert", "context", "batch", "dose")}
    t = torch.zeros(b["target"].shape[0], dtype=torch.long)
    with torch.no_grad(), FlopCounterMode(display=False) as fwd:
        net(b["target"], b["target"], b["control"], t, cov)
    with FlopCounterMode(display=False) as step:
        trainer.train_step(itertools.repeat(batch))
    return {"forward": fwd.get_total_flops(), "step": step.get_total_flops()}


# -- workers (one subprocess each) ------------------------------------------------------------------------------
def worker_preset(args) -> dict:
    """Everything for one preset: parameters, FLOPs, matmul peak, training, sampling, profile, peak RSS."""
    load0, rss0 = os.getloadavg(), peak_rss_mib()
    cfg = Config.from_preset(args.worker)
    S, B, G = cfg.data.set_size, args.sets, args.genes
    trainer, batch = make_trainer(cfg, G), make_batch(B, S, G)
    res = {"preset": args.worker, "S": S, "B": B, "G": G, "params": count_parameters(trainer.net),
           "model": dataclasses.asdict(cfg.model), "flops": step_flops(cfg.model, G, B, S),
           "flops_by_part": forward_flops(cfg.model, G, B, S), "rss_import_mib": rss0}
    torch.set_num_threads(args.thread_list[0])
    res["flops_counted"] = counted_flops(trainer, batch)
    res["peak_gflops"] = matmul_peak(args.thread_list)
    res["train"] = bench_train(trainer, batch, args.thread_list, args)
    res["rss_after_train_mib"] = peak_rss_mib()
    torch.set_num_threads(args.thread_list[0])
    res["profile"] = profile_step(trainer, batch)
    res["sample"] = bench_sample(trainer.ema.module, cfg, batch, args.thread_list, args)
    res["peak_gflops_end"] = matmul_peak(args.thread_list)
    res.update(rss_peak_mib=peak_rss_mib(), load_start=load0, load_end=os.getloadavg())
    return res


def worker_scaling(args) -> dict:
    """Training-step time of the `small` preset over set sizes and gene counts (one thread count)."""
    load0, th = os.getloadavg(), args.scaling_threads
    torch.set_num_threads(th)
    peak0 = matmul_peak([th])
    cfg = Config.from_preset("small")
    trainers = {g: make_trainer(cfg, g) for g in SCALING_G}
    grid = [(g, s) for g in SCALING_G for s in SCALING_S]
    batches = {(g, s): itertools.repeat(make_batch(args.sets, s, g)) for g, s in grid}
    calls = [lambda g=g, s=s: trainers[g].train_step(batches[g, s]) for g, s in grid]
    for call in calls:
        call()
    times: list[list[float]] = [[] for _ in grid]
    for _ in range(args.rounds):  # rounds over the whole grid, so load changes hit every cell alike
        for i, call in enumerate(calls):
            t = time.perf_counter()
            call()
            times[i].append(time.perf_counter() - t)
    rows = [{"G": g, "S": s, "step_s": statistics.median(ts), "model_flops": f["model_step"], "ed_flops": f["ed_step"]}
            for (g, s), ts in zip(grid, times) for f in [step_flops(cfg.model, g, args.sets, s)]]
    return {"threads": th, "B": args.sets, "rows": rows, "peak_gflops": peak0, "peak_gflops_end": matmul_peak([th]),
            "load_start": load0, "load_end": os.getloadavg()}


def run_worker(name: str, argv: list[str], omp_wait_policy: str) -> dict:
    """Run this script as a subprocess worker; its result comes back through a JSON file."""
    env = {**os.environ, "OMP_WAIT_POLICY": omp_wait_policy.upper()} if omp_wait_policy else None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--worker", name, "--result", str(path), *argv]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, env=env)
        res = json.loads(path.read_text())
    res["wall_s"] = time.perf_counter() - t
    print(f"  {name}: {res['wall_s']:.0f} s", file=sys.stderr)
    return res


# -- report ----------------------------------------------------------------------------------------------------
def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _peak(res: dict, th: int) -> float:
    """The better of the matmul peaks measured at the start and the end of the worker."""
    return max(res["peak_gflops"][str(th)], res["peak_gflops_end"][str(th)])


def preset_table(results: list[dict]) -> str:
    rows = []
    for r in results:
        m, f, c = r["model"], r["flops"], r["flops_counted"]
        rows.append([r["preset"], f"{m['hidden']} / {m['depth']} / {m['heads']}", r["S"], f"{r['params']:,}",
                     f"{f['forward'] / 1e9:.2f} / {c['forward'] / 1e9:.2f}",
                     f"{f['model_step'] / 1e9:.1f} + {f['ed_step'] / 1e9:.1f}", f"{c['step'] / 1e9:.1f}",
                     f"{r['rss_import_mib']:,.0f} / {r['rss_after_train_mib']:,.0f} / {r['rss_peak_mib']:,.0f}"])
    header = ["preset", "H / depth / heads", "S", "parameters", "forward GFLOP (analytic / counted)",
              "step GFLOP (model + ED)", "step GFLOP counted", "peak RSS MiB (import / +train / +sample)"]
    return _table(header, rows)


def train_table(results: list[dict]) -> str:
    rows = []
    for r in results:
        cells, flops = r["B"] * r["S"], r["flops"]["model_step"]
        base = r["train"][str(min(int(t) for t in r["train"]))]["step_s"]
        for th, t in sorted(r["train"].items(), key=lambda kv: int(kv[0])):
            s, peak = t["step_s"], _peak(r, int(th))
            rows.append([r["preset"], th, f"{s * 1e3:,.0f}", f"{1 / s:.2f}", f"{cells / s:,.0f}",
                         f"{flops / s / 1e9:.1f}", f"{peak:.1f}", f"{flops / s / 1e9 / peak:.0%}",
                         f"{base / s:.2f}", t["n_timed"]])
    header = ["preset", "threads", "ms/step", "steps/s", "cells/s", "model GFLOP/s", "matmul peak GFLOP/s", "MFU",
              "speed vs fewest threads", "steps timed"]
    return _table(header, rows)


def sample_table(results: list[dict]) -> str:
    rows = []
    for r in results:
        cells = r["B"] * r["S"]
        base = {s["name"]: s["call_s"] for s in r["sample"] if s["threads"] == min(x["threads"] for x in r["sample"])}
        for s in r["sample"]:
            timed = f"{s['evals_timed']}" + ("" if s["evals_timed"] == s["evals"] else " *")
            rows.append([r["preset"], s["name"], s["evals"], s["threads"], f"{s['call_s']:.2f}",
                         f"{cells / s['call_s']:,.0f}", f"{base[s['name']] / s['call_s']:.2f}", timed])
    header = ["preset", "sampler", "network evals", "threads", "s per call (B·S cells)", "cells/s",
              "speed vs fewest threads", "evals timed"]
    return _table(header, rows)


def profile_table(results: list[dict]) -> str:
    rows = [[r["preset"], "; ".join(f"{p['op'].removeprefix('aten::')} {p['share']:.0%}" for p in r["profile"])]
            for r in results]
    return _table(["preset", "self CPU time of one training step, top ops"], rows)


def scaling_tables(sc: dict) -> str:
    rows = {g: [r for r in sc["rows"] if r["G"] == g] for g in SCALING_G}
    header = ["G \\ S", *[str(s) for s in SCALING_S]]
    ms = _table(header, [[g, *[f"{r['step_s'] * 1e3:,.0f}" for r in rs]] for g, rs in rows.items()])
    gf = _table(header, [[g, *[f"{r['model_flops'] / r['step_s'] / 1e9:.1f}" for r in rs]] for g, rs in rows.items()])
    return f"ms per training step:\n\n{ms}\n\nmodel GFLOP/s:\n\n{gf}"


def plot_scaling(sc: dict, path: Path) -> None:
    """Step time and achieved GFLOP/s against S, one line per G (log axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3.2))
    for g in SCALING_G:
        rs = [r for r in sc["rows"] if r["G"] == g]
        s = [r["S"] for r in rs]
        ax1.plot(s, [r["step_s"] * 1e3 for r in rs], "o-", label=f"G = {g}")
        ax2.plot(s, [r["model_flops"] / r["step_s"] / 1e9 for r in rs], "o-", label=f"G = {g}")
    ax2.axhline(_peak(sc, sc["threads"]), color="grey", ls="--", label="matmul peak")
    for ax, title in ((ax1, "ms per training step"), (ax2, "model GFLOP/s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("set size S")
        ax.set_title(title, fontsize=10)
    ax1.set_yscale("log")
    ax1.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax1.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax1.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax2.set_ylim(bottom=0)
    ax2.legend(fontsize=8)
    fig.suptitle(f"preset small, B = {sc['B']}, {sc['threads']} thread(s)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": sys.version.split()[0]}


# -- main ------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="tiny,small,medium", help="comma-separated presets (perturbdiff.config)")
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts, measured interleaved")
    p.add_argument("--genes", type=int, default=2000, help="number of genes G")
    p.add_argument("--sets", type=int, default=8, help="sets per batch B")
    p.add_argument("--rounds", type=int, default=3, help="timed repeats per configuration (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed training steps per thread count")
    p.add_argument("--seconds", type=float, default=40.0, help="training time budget per preset (>= 2 rounds)")
    p.add_argument("--sample-seconds", type=float, default=12.0,
                   help="sampling budget per mode and thread count; longer calls are timed shortened and scaled")
    p.add_argument("--omp-wait-policy", default="", choices=["", "active", "passive"],
                   help="OMP_WAIT_POLICY for the workers ('' = the OpenMP runtime's default, which spins)")
    p.add_argument("--scaling-threads", type=int, default=1, help="thread count of the S × G scaling grid")
    p.add_argument("--no-scaling", action="store_true", help="skip the S × G scaling grid of the small preset")
    p.add_argument("--plot", default="docs/figures/scaling_small.png", help="PNG of the scaling grid ('' = none)")
    p.add_argument("--out", default="", help="write the raw numbers to this JSON file")
    p.add_argument("--worker", default="", help="internal: run one preset (or 'scaling') and write --result")
    p.add_argument("--result", default="", help="internal: JSON result path of a worker")
    args = p.parse_args(argv)
    args.thread_list = [int(t) for t in args.threads.split(",")]
    return args


def report(info: dict, presets: list[dict], scaling: dict | None) -> str:
    """The markdown report: machine and load, then the preset tables and the scaling grid."""
    a = info["args"]
    load = {k: "/".join(f"{x:.1f}" for x in info[k]) for k in ("load_start", "load_end")}
    out = [f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}; load average (1/5/15 min) "
           f"start {load['load_start']}, end {load['load_end']}; wall {info['wall_s']:.0f} s",
           f"G = {a['genes']}, B = {a['sets']}, threads {a['threads']}, OMP_WAIT_POLICY {info['omp_wait_policy']}"]
    if presets:
        out += [f"### Presets\n\n{preset_table(presets)}", f"### Training\n\n{train_table(presets)}",
                f"### Sampling (* = timed on a shortened call, scaled)\n\n{sample_table(presets)}",
                f"### Where a training step's time goes\n\n{profile_table(presets)}"]
    if scaling is not None:
        out.append(f"### Scaling, preset small, B = {scaling['B']}, {scaling['threads']} thread(s)\n\n"
                   f"{scaling_tables(scaling)}")
    return "\n\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        res = worker_scaling(args) if args.worker == "scaling" else worker_preset(args)
        Path(args.result).write_text(json.dumps(res))
        return
    passthrough = list(argv if argv is not None else sys.argv[1:])
    policy = args.omp_wait_policy or os.environ.get("OMP_WAIT_POLICY", "(runtime default)")
    info = {**machine(), "omp_wait_policy": policy, "load_start": os.getloadavg(), "args": vars(args).copy()}
    t0 = time.perf_counter()
    presets = [run_worker(name, passthrough, args.omp_wait_policy) for name in args.presets.split(",") if name]
    scaling = None if args.no_scaling else run_worker("scaling", passthrough, args.omp_wait_policy)
    info.update(load_end=os.getloadavg(), wall_s=time.perf_counter() - t0)
    print(report(info, presets, scaling))
    if scaling is not None and args.plot:
        plot_scaling(scaling, Path(args.plot))
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": info, "presets": presets, "scaling": scaling}, indent=1))


if __name__ == "__main__":
    main()
