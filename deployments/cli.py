"""The ``dreamflow`` command: ``up`` (the stack) and ``demo`` (one offline training end to end)."""

from __future__ import annotations

import argparse
import logging
import sys

from flows.settings import get_settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dreamflow", description="Self-hosted DreamBooth / LoRA training.")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start Prefect server, worker and the REST facade on 127.0.0.1")
    up.add_argument("--workers", type=int, default=1, help="process workers to start")
    demo = sub.add_parser("demo", help="train a LoRA on bundled photos with the tiny model, offline")
    demo.add_argument("--steps", type=int, default=60, help="training steps")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dreamflow`` console script."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    settings = get_settings()
    if args.command == "up":
        from deployments.stack import run_stack

        run_stack(settings, workers=args.workers)
        return 0
    from deployments.demo import run_demo

    return run_demo(settings, steps=args.steps)


if __name__ == "__main__":
    sys.exit(main())
