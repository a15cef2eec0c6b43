"""The `moesys` command: one subcommand per job, each implemented in its own module.

A subcommand module provides `add_arguments(parser)` and `run(args) -> int`; it is imported only when
its subcommand runs, so `moesys --help` stays fast and an optional dependency missing for one job does
not break the others.

Every subcommand reports alike (`guarded`): a bad argument, value or file is one line
`moesys COMMAND: error: ...` on stderr and exit code 2; Ctrl-C is one line and 130; SIGTERM raises
`Terminated` in the main thread, so temp directories are removed as for any exception, then one line
and 143. A reader that leaves stdout early (`moesys config --show | head`) ends the command quietly with
141, as SIGPIPE ends other tools. `MOESYS_TRACEBACK=1` shows the traceback instead, for bug reports.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
from collections.abc import Callable

# name -> (module, one-line help)
_COMMANDS = {
    "train": ("moesys.train", "train an MoE language model (one process; use torchrun/mpirun for several)"),
    "generate": ("moesys.offload.cli", "generate text with experts offloaded to host memory"),
    "upcycle": ("moesys.upcycling", "turn a dense Hugging Face checkpoint into an MoE checkpoint"),
    "export": ("moesys.export", "write a training run's checkpoint as a Hugging Face directory"),
    "plot": ("moesys.plot", "plot a training run's loss curves and expert load"),
    "config": ("moesys.config_cli", "print the training config schema: every key with type, default and meaning"),
}


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so clean-up runs as for any exception. A BaseException like
    KeyboardInterrupt, so no `except Exception` on the way swallows it."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every optional option's help ends with its default; descriptions keep their line breaks.

    A flag (an option taking no value) shows `(default: off)`: argparse's own default would print
    `--no-progress ... (default: True)`, the value of the destination, which reads as "on by default".
    A help that already names its default (`(default: RUN_DIR/plots)`) gets no second one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required or "(default:" in text:
            return text
        if action.option_strings and action.nargs == 0 and action.default is not argparse.SUPPRESS:
            return f"{text} (default: off)"
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `PROG: error: MESSAGE (see PROG --help)`, exit code 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def one_line(error: BaseException) -> str:
    """The message of `error` on one line (a config error lists each bad key on its own line)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines) or type(error).__name__


@contextlib.contextmanager
def _sigterm_raises() -> contextlib.AbstractContextManager[None]:
    def handle(signum, frame):
        raise Terminated

    try:
        previous = signal.signal(signal.SIGTERM, handle)
    except ValueError:                 # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _drop_stdout() -> None:
    """After a BrokenPipeError on stdout: point its descriptor at /dev/null, so the output still buffered
    goes nowhere at exit instead of raising again (Python's documented recipe for SIGPIPE)."""
    try:
        fd = sys.stdout.fileno()
        devnull = os.open(os.devnull, os.O_WRONLY)
        if devnull != fd:
            os.dup2(devnull, fd)
            os.close(devnull)
    except (OSError, ValueError):   # no real descriptor (a captured stream): nothing is flushed at exit
        pass


def guarded(prog: str, body: Callable[[], int | None], *, sigterm: bool = True) -> int:
    """Run `body` and turn what a user can cause into one line on stderr and an exit code. `sigterm`:
    raise Terminated on SIGTERM (training keeps its own handler: it checkpoints, then exits)."""
    signals = _sigterm_raises() if sigterm else contextlib.nullcontext()
    if os.environ.get("MOESYS_TRACEBACK") == "1":
        with signals:
            return int(body() or 0)
    try:
        with signals:
            try:
                return int(body() or 0)
            finally:
                sys.stdout.flush()   # a reader gone (`| head`) shows here, not in Python's exit flush
    except BrokenPipeError:
        _drop_stdout()
        return 141
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{prog}: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except (ValueError, OSError) as e:   # bad values, files, permissions: the message names them
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2


def _version() -> str:
    from moesys import __version__
    return f"moesys {__version__}"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="moesys", description="Mixture-of-Experts training and inference.")
    parser.add_argument("--version", action="version", version=_version(), help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in _COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def command_parser(name: str) -> argparse.ArgumentParser:
    """The parser of subcommand `name`, its module imported."""
    module_name, help_text = _COMMANDS[name]
    parser = Parser(prog=f"moesys {name}", description=help_text)
    importlib.import_module(module_name).add_arguments(parser)
    return parser


def _top_level(argv: list[str]) -> int:
    parser = build_parser()
    if argv and not argv[0].startswith("-"):
        parser.error(f"unknown command {argv[0]!r}; choose from {', '.join(_COMMANDS)}")
    parser.parse_args(argv)
    parser.print_help()
    return 0 if argv else 2


def _subcommand(name: str, argv: list[str]) -> int | None:
    parser = command_parser(name)   # imports the subcommand's module, and with it torch: seconds
    args = parser.parse_args(argv)
    return importlib.import_module(_COMMANDS[name][0]).run(args)


def main(argv: list[str] | None = None) -> int:
    """The console script `moesys`. Everything after reading argv runs inside `guarded`, the subcommand's
    imports included: this module and `moesys/__init__` import nothing heavy, so a Ctrl-C in the first
    seconds is one line too, not a traceback from inside torch's import."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in _COMMANDS:
        return guarded("moesys", lambda: _top_level(argv))
    name = argv[0]
    return guarded(f"moesys {name}", lambda: _subcommand(name, argv[1:]), sigterm=name != "train")


if __name__ == "__main__":
    sys.exit(main())
