"""The `moesys` command: one subcommand per job, each implemented in its own module.

A subcommand module provides `add_arguments(parser)` and `run(args) -> int`; it is imported only when
its subcommand runs, so `moesys --help` stays fast and an optional dependency missing for one job does
not break the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
_COMMANDS = {
    "train": ("moesys.train", "train an MoE language model (one process; use torchrun/mpirun for several)"),
    "generate": ("moesys.offload.cli", "generate text with experts offloaded to host memory"),
    "upcycle": ("moesys.upcycling", "turn a dense Hugging Face checkpoint into an MoE checkpoint"),
    "export": ("moesys.export", "write a training run's checkpoint as a Hugging Face directory"),
    "plot": ("moesys.plot", "plot a training run's loss curves and expert load"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moesys", description="Mixture-of-Experts training and inference.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in _COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in _COMMANDS:
        parser = build_parser()
        if argv and not argv[0].startswith("-"):
            parser.error(f"unknown command {argv[0]!r}; choose from {', '.join(_COMMANDS)}")
        parser.parse_args(argv)
        parser.print_help()
        return 0 if argv else 2
    name = argv[0]
    module_name, help_text = _COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"moesys {name}", description=help_text)
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(argv[1:])) or 0)


if __name__ == "__main__":
    sys.exit(main())
