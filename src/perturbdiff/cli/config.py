"""``perturbdiff config``: the resolved configuration a training command would use, or every key with its default."""

from __future__ import annotations

import argparse

from perturbdiff.cli.train import add_config_arguments, resolve_config
from perturbdiff.config import RULES, Config


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, training=False)
    p.add_argument("--keys", action="store_true", help="list every SECTION.KEY that --set takes, with its default "
                                                       "and its valid range")


def run(args: argparse.Namespace) -> int:
    if args.keys:
        for key, default in Config.keys().items():
            rule = RULES.get(key)
            print(f"{key} = {default!r}" + (f"    # {rule[1]}" if rule else ""))
        return 0
    print(resolve_config(args).to_toml(), end="")
    return 0
