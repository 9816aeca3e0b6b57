"""``perturbdiff info``: what a trained run knows."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory or .safetensors checkpoint")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"], help="which checkpoint of the run")
    p.add_argument("--json", action="store_true", help="print everything as JSON (genes included)")


def run(args: argparse.Namespace) -> int:
    from perturbdiff.model import PerturbDiff, Pretrained, is_pretrained_run

    if is_pretrained_run(args.run, args.checkpoint):
        return _pretrained_info(Pretrained.load(args.run, which=args.checkpoint), args.json)
    model = PerturbDiff.load(args.run, which=args.checkpoint)
    info = model.info()
    info.update(perturbation_coverage(info, model.cfg.model.pert_embedding))
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return 0
    rec = info["record"]
    print(f"genes: {info['n_genes']} ({', '.join(info['genes'][:5])}, ...)")
    seen, table = info["perturbations"], info["via_embedding_table"]
    print(f"perturbations seen in training ({len(seen)}): {', '.join(seen)}")
    blocks = info["summary"].get("prior_blocks") or []
    routes = "+".join(b["route"] for b in blocks) or "the embedding table"
    where = f" ({info['embedding_table']})" if info["embedding_table"] else ""
    shown = ": " + ", ".join(table[:20]) + (", ..." if len(table) > 20 else "") if table else ""
    print(f"representable: the {len(seen)} seen, {len(table)} more through {routes}{where}{shown}; "
          "combinations A+B of representable parts; anything else is refused by predict")
    for b in blocks:
        placed = f", {len(b['placed'])} placed among seen neighbours" if b.get("placed") else ""
        print(f"  prior {b['route']}: {b['n_labels']} labels, {b['columns']} dimensions{placed}")
    if info["summary"].get("anchor"):
        print(f"anchor: every set starts from the {info['summary']['anchor']} baseline's shift of its condition "
              "(fitted on the training conditions, each left out of its own)")
    print(f"control value: {info['control']}")
    for col, vals in info["contexts"].items():
        print(f"context {col!r} ({len(vals)}): {', '.join(vals)}")
    print("  (other context values are predicted with the <unknown> context token)")
    print(f"keys: {json.dumps(info['keys'])}")
    print(f"preprocessing: input {rec.get('input_kind')}, normalize {rec.get('normalize')}, "
          f"log1p {rec.get('log1p')}, scale {rec.get('scale')}, genes by {rec.get('gene_selection', {})}")
    print(f"split: {info['split']}")
    shown = {k: v for k, v in info["summary"].items() if k not in ("codec", "prior_blocks", "anchor")}
    print(f"training data: {json.dumps(shown)}")
    codec = info.get("codec") or {}
    if codec.get("kind") == "latent":
        q = codec.get("quality") or {}
        print(f"codec: latent, {codec.get('n_genes')} genes -> {codec.get('dim')} dimensions; held-out "
              f"reconstruction: cell r {q.get('cell_pearson', float('nan')):.3f}, zero rate "
              f"{q.get('zero_rate_decoded', float('nan')):.3f} (data {q.get('zero_rate_data', float('nan')):.3f})")
    else:
        print(f"codec: {codec.get('kind', 'scale')} (every gene)")
    state = info.get("state") or {}
    print(f"trained steps: {state.get('step')}, best step {state.get('best_step')}")
    print(f"versions: {json.dumps(info.get('versions'))}")
    return 0


def perturbation_coverage(info: dict, table: str) -> dict:
    """Perturbation parts representable only through a prior or the frozen embedding table (not seen in
    training)."""
    seen = set(info.get("perturbations", []))
    extra = [p for p in info.get("representable", []) if p not in seen]
    return {"via_embedding_table": extra, "embedding_table": table or ""}


def _pretrained_info(pre, as_json: bool) -> int:
    """What a pretraining run knows: vocabulary, data sets, contexts."""
    info = pre.info()
    if as_json:
        print(json.dumps(info | {"genes": pre.genes}, indent=1, default=str))
        return 0
    print(f"pretraining run: {info['n_genes']} genes in the vocabulary ({', '.join(pre.genes[:5])}, ...)")
    for d in info["datasets"]:
        print(f"data set {d['name']!r}: {d['n_cells']} {d['cells']}, {d['n_genes']} genes, context "
              f"{'/'.join(d['context_keys'])} ({len(d['contexts'])}: {', '.join(d['contexts'][:10])})")
    state = info.get("state") or {}
    print(f"trained steps: {state.get('step')}; versions: {json.dumps(info.get('versions'))}")
    return 0
