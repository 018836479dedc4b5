"""The ``softxent`` command line: ``demo``, ``check`` and ``bench``."""

from __future__ import annotations

import argparse
import sys

from . import bench, check, demo
from .arguments import UsageError

COMMANDS = {
    "demo": (demo, "train the seed's network on scikit-learn's digits, backprop from p - y"),
    "check": (check, "float64 finite-difference checks of every function and option"),
    "bench": (bench, "time softxent against PyTorch eager, torch.compile and installed peers"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="softxent",
        description="softmax, log-softmax, logsumexp and cross-entropy: exact, stable, fast.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=module.__doc__.split("\n\n")[0])
        module.add_arguments(cmd)
        cmd.set_defaults(run=module.main, parser=cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``softxent COMMAND …``; returns the exit status.  Bad options exit with status 2 and the
    command's usage, whether argparse finds them or the command does (:class:`UsageError`)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UsageError as error:
        args.parser.error(str(error))  # exits with status 2


if __name__ == "__main__":
    sys.exit(main())
