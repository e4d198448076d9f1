"""Entry point of the ``scforge`` command line: one thin sub-command per task."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    run_demo(Path(args.output), max_epochs=args.max_epochs, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scforge",
        description="Pretrain, fine-tune and apply single-cell transformer foundation models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = sub.add_parser(
        "demo",
        help="pretrain a small model on pbmc68k_reduced (ships with scanpy) and draw a UMAP",
        description=(
            "Pretrain a small rank-value transformer on scanpy's pbmc68k_reduced (700 PBMCs, "
            "no download), write its embeddings into an .h5ad file and a UMAP coloured by "
            "bulk_labels, and print a kNN accuracy of the embedding."
        ),
    )
    demo.add_argument(
        "--output", default="scforge_demo", help="output folder (default: %(default)s)"
    )
    demo.add_argument(
        "--max-epochs", type=int, default=8, help="pretraining epochs (default: %(default)s)"
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``scforge`` command line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
