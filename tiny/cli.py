"""`moeserve make-tiny`: its arguments and what it runs."""

from __future__ import annotations

import argparse
from pathlib import Path


def _make_tiny(args: argparse.Namespace) -> int:
    from moeserve.tiny import make_tiny

    path = make_tiny(args.arch, args.out_dir, seed=args.seed)
    print(path)
    return 0


def add_tiny_commands(sub: argparse._SubParsersAction) -> None:
    from moeserve.tiny import TINY_ARCHS

    tiny = sub.add_parser("make-tiny", help="write a tiny random-weight Hugging Face checkpoint for tests and demos")
    tiny.add_argument("arch", choices=TINY_ARCHS)
    tiny.add_argument("out_dir", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_make_tiny)
