"""The ``fastadv`` command line: ``fastadv {demo,train,eval,attack,mia,bench,info} --help``.

Runs are configured by YAML/JSON files (``--config``) with ``--set key=value`` overrides; each run writes a run
folder (``--out``, default ``./fastadv-runs/<command>-<time>``). Mistakes in the command, the config or the data
paths end with a one-line message and exit code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .config import ConfigError

# subcommand -> module implementing add_parser(subparsers) and run(args) -> int
COMMANDS = {
    "demo": "fastadv.cli.cmd_demo",
    "train": "fastadv.cli.cmd_train",
    "eval": "fastadv.cli.cmd_eval",
    "attack": "fastadv.cli.cmd_attack",
    "mia": "fastadv.cli.cmd_mia",
    "bench": "fastadv.cli.cmd_bench",
    "info": "fastadv.cli.cmd_info",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit code 2
        self.exit(2, f"{self.prog}: error: {message}\n  (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastadv", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, module in COMMANDS.items():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print(f"fastadv {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `fastadv info | head`: the reader left; nothing more to say
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except (ConfigError, FileNotFoundError, NotADirectoryError, ValueError) as exc:
        if args.debug:
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"fastadv {args.command}: error: {message}", file=sys.stderr)
        return 2
