"""Command line: ``qsparse demo`` (also ``python -m qsparse_compile demo``)."""

from __future__ import annotations

import argparse
import sys


def _sparsity(text: str) -> float:
    from .config import check_sparsity

    try:
        return check_sparsity(float(text), "--sparsity")
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qsparse", description="Make any PyTorch language model fully sparsely activated.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="compile a small Llama-style model at 40%% sparsity, "
                                       "print the report and check it against the reference")
    demo.add_argument("--sparsity", type=_sparsity, default=0.4, help="default: 0.4")
    demo.add_argument("--inner", choices=("inductor", "eager"), default="inductor",
                      help="inner compiler after the rewrite (default: inductor)")
    demo.add_argument("--seq-len", type=int, default=32, help="tokens per sequence")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(sparsity=args.sparsity, inner=args.inner, seq_len=args.seq_len)
    return 0


if __name__ == "__main__":
    sys.exit(main())
