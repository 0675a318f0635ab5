"""Write a task split as JSONL.

python -m moeserve.demo.tasks math train 2000 --out math-train.jsonl [--seed 0] [--chat]
"""

from __future__ import annotations

import argparse
import logging

from moeserve.demo.tasks import SPLITS, TASKS, get_task, to_chat, write_jsonl


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moeserve.demo.tasks", description=__doc__)
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("split", choices=SPLITS)
    parser.add_argument("n", type=int)
    parser.add_argument("--out", required=True, help="the JSONL file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chat", action="store_true", help='write {"messages": [...]} records instead')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    records = get_task(args.task).generate(args.split, args.n, seed=args.seed)
    write_jsonl([to_chat(r) for r in records] if args.chat else records, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
