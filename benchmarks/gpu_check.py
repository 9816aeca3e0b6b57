"""One short, prepared run on a CUDA device: training throughput and MFU in bf16 per preset against the device's
measured bf16 matmul peak, sampling throughput, peak memory, and exact resume on the device.

    python benchmarks/gpu_check.py [--presets small,medium,base] [--seconds 20] [--out gpu_check.json]
    python benchmarks/gpu_check.py --device cpu --presets tiny --genes 64 --seconds 1   # its logic, on a CPU

Training = `Trainer.train_step` (the process's loss with the self-conditioning pass and the energy distance, backward,
clip, AdamW, EMA) under bf16 autocast (train.precision = bf16), on a random batch of B sets of the preset's S at
G genes. Model FLOPs per step are bench_model.py's analytic count (4 forwards); MFU = model FLOP/s / the peak of a
bf16 matmul of two 8192² matrices timed here (use --peak-tflops for the datasheet's number instead). "authors" is the
paper's configuration: base (H 512, depth 8) at S = 256, 8 sets. Exact resume: a tiny planted-data run trained 6
steps straight and 3 + 3 with a resume must give identical weights on the device. Markdown to stdout.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import VOCAB_SIZES, make_batch, step_flops  # noqa: E402
from perturbdiff.config import Config, SampleConfig  # noqa: E402
from perturbdiff.diffusion import make_process  # noqa: E402
from perturbdiff.nn import Denoiser, count_parameters  # noqa: E402
from perturbdiff.train import Trainer  # noqa: E402

#: preset name -> (config preset, overrides)
CONFIGS = {"tiny": ("tiny", []), "small": ("small", []), "medium": ("medium", []), "base": ("base", []),
           "authors": ("base", ["data.set_size=256", "data.batch_sets=8"])}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_calls(fn, device: torch.device, seconds: float, min_calls: int = 3) -> list[float]:
    """Seconds per call of ``fn`` (synchronised), for ``seconds`` or at least ``min_calls`` calls."""
    out, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(out) < min_calls:
        t = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t)
    return out


def bf16_peak(device: torch.device, n: int = 8192) -> float:
    """TFLOP/s of an n×n bf16 matmul (best of 10 after warm-up)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    return 2 * n**3 / min(timed_calls(lambda: a @ b, device, 0.0, 10)) / 1e12


def bench_preset(name: str, device: torch.device, genes: int, seconds: float, peak: float) -> dict:
    preset, items = CONFIGS[name]
    cfg = Config.from_preset(preset).with_items([*items, "train.precision=bf16"])
    S, B = cfg.data.set_size, cfg.data.batch_sets
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer = Trainer(Denoiser(cfg.model, genes, VOCAB_SIZES), make_process(cfg.diffusion), None, cfg, meta=dict,
                      device=device)
    batch = {k: v.to(device) for k, v in make_batch(B, S, genes).items()}
    batches = itertools.repeat(batch)
    for _ in range(3):  # warm-up (kernels, allocator)
        trainer.train_step(batches)
    sync(device)
    step_s = statistics.median(timed_calls(lambda: trainer.train_step(batches), device, seconds))
    train_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    flops = step_flops(cfg.model, genes, B, S)["model_step"]
    net, cov = trainer.ema.module.eval(), {k: batch[k] for k in ("pert", "context", "batch", "dose")}
    settings = SampleConfig(steps=cfg.sample.steps, solver=cfg.sample.solver)
    gen = torch.Generator(device=device).manual_seed(0)

    def sample():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            trainer.process.sample(net, batch["control"], cov, settings, generator=gen)

    sample()
    sample_s = statistics.median(timed_calls(sample, device, seconds / 2))
    return {"preset": name, "S": S, "B": B, "G": genes, "params": count_parameters(trainer.net),
            "step_s": step_s, "steps_per_s": 1 / step_s, "cells_per_s": B * S / step_s,
            "model_tflops": flops / step_s / 1e12, "mfu": flops / step_s / 1e12 / peak,
            "sample_cells_per_s": B * S / sample_s, "sample_evals": trainer.process.evaluations(settings),
            "train_peak_gib": train_mem}


def exact_resume(device: torch.device) -> dict:
    """6 steps straight vs 3 + resume + 3 on the device: identical weights?"""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from perturbdiff.model import PerturbDiff
    from test_train import planted_data, tiny_config

    adata, split = planted_data(n_per_group=40)
    cfg = tiny_config(max_steps=6, val_every=3, log_every=1)
    with tempfile.TemporaryDirectory() as tmp:
        full = PerturbDiff.from_config(cfg, adata, split).train(out_dir=Path(tmp) / "a", progress=False,
                                                                device=device)
        real_step = Trainer.train_step

        def interrupted(self, batches):  # Ctrl-C after step 3 (the loop saves its last checkpoint on the way out)
            if self.state.step == 3:
                raise KeyboardInterrupt
            return real_step(self, batches)

        Trainer.train_step = interrupted
        try:
            PerturbDiff.from_config(cfg, adata, split).train(out_dir=Path(tmp) / "b", progress=False, device=device)
        except KeyboardInterrupt:
            pass
        finally:
            Trainer.train_step = real_step
        resumed = PerturbDiff.from_config(cfg, adata, split).train(out_dir=Path(tmp) / "b", progress=False,
                                                                   device=device)
    pairs = list(zip(full.network.state_dict().values(), resumed.network.state_dict().values()))
    return {"identical": all(torch.equal(a.cpu(), b.cpu()) for a, b in pairs),
            "max_abs_diff": max(float((a.cpu().float() - b.cpu().float()).abs().max()) for a, b in pairs)}


def report(res: dict) -> str:
    lines = [f"device: {res['device_name']}; bf16 matmul peak {res['peak_tflops']:.3g} TFLOP/s "
             f"({res['peak_source']}); exact resume: {res['resume']}", "",
             "| preset | S × B | G | parameters | ms / step | steps/s | cells/s | model TFLOP/s | MFU | sample cells/s "
             "(evals) | train peak GiB |", "|" + "---|" * 11]
    for r in res["presets"]:
        lines.append(f"| {r['preset']} | {r['S']} × {r['B']} | {r['G']} | {r['params']:,} | {r['step_s'] * 1e3:.1f} | "
                     f"{r['steps_per_s']:.1f} | {r['cells_per_s']:,.0f} | {r['model_tflops']:.1f} | {r['mfu']:.0%} | "
                     f"{r['sample_cells_per_s']:,.0f} ({r['sample_evals']}) | {r['train_peak_gib']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--presets", default="small,medium,base,authors")
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=20.0, help="timing budget per preset (training)")
    ap.add_argument("--peak-tflops", type=float, help="the device's bf16 peak (default: measured)")
    ap.add_argument("--no-resume-check", action="store_true")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here (pass --device cpu to try its logic)")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or bf16_peak(device, 8192 if device.type == "cuda" else 256)
    res = {"device_name": name, "torch": torch.__version__, "peak_tflops": peak,
           "peak_source": "given" if args.peak_tflops else "measured", "presets": []}
    for p in args.presets.split(","):
        res["presets"].append(bench_preset(p, device, args.genes, args.seconds, peak))
        print(f"{p}: {res['presets'][-1]['steps_per_s']:.1f} steps/s", file=sys.stderr, flush=True)
    res["resume"] = "not checked" if args.no_resume_check else exact_resume(device)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    print(report(res))
    return res


if __name__ == "__main__":
    main()
