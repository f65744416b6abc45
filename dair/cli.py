"""`dair`: the umbrella command. Each subcommand lives in dair/commands/<name>.py and
registers itself through `register(subparsers)`; its handler returns an exit code."""
from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from dair import __version__
from dair.errors import DairError

COMMANDS = ["model", "tokenize", "generate", "chat", "score", "bench", "up", "status", "plan", "keys", "serve"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dair", description="distributed AirLLM: one model, several CPU machines")
    parser.add_argument("--version", action="version", version=f"dair {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"dair.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"dair.commands.{name}":
                raise
            continue
        module.register(sub)
    return parser


# Arguments that are text for the model (not file names): checked to be UTF-8 before any work.
TEXT_ARGS = {"prompt": "the prompt", "text": "--text", "system": "--system", "generate": "--generate",
             "stop": "--stop"}
EXIT_OUTPUT_CLOSED = 1  # as cat, echo and other Unix tools exit when they cannot write


def _say(prog: str, message: str) -> None:
    if sys.stderr is not None:  # stderr may be closed too
        print(f"{prog}: {message}", file=sys.stderr)


def _silence_stdout() -> None:
    """Point fd 1 at /dev/null, so that the interpreter's last flush raises nothing either."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
    except OSError:
        pass


class OutputError(Exception):
    """Standard output could not be written (closed, disk full, I/O error)."""

    def __init__(self, e: OSError) -> None:
        super().__init__(e.strerror or str(e))
        self.errno = e.errno


class _GuardedOutput:
    """sys.stdout, with its write errors told apart from those of model, key or socket files."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as e:
            raise OutputError(e) from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as e:
            raise OutputError(e) from None

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def run(handler, args: argparse.Namespace, prog: str = "dair") -> int:
    """Run a handler, turning DairError into one line on stderr and exit code 2."""
    try:
        return int(handler(args) or 0)
    except DairError as e:
        _say(prog, f"error: {e}")
        return 2
    except KeyboardInterrupt:
        _say(prog, "interrupted")
        return 130
    except (BrokenPipeError, OutputError) as e:
        _silence_stdout()
        if getattr(e, "errno", None) != errno.EPIPE:
            _say(prog, f"error: cannot write to standard output: {e}")
        # The reader went away (`dair generate ... | head -1`): quietly, like any pipe writer.
        return EXIT_OUTPUT_CLOSED


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    if sys.stdout is None:
        # fd 1 closed (`dair generate Hi >&-`): the answer has nowhere to go; say so before any work.
        _say("dair", "error: standard output is closed")
        return EXIT_OUTPUT_CLOSED
    try:
        from dair.commands.text import check_utf8

        for attr, what in TEXT_ARGS.items():
            value = getattr(args, attr, None)
            for v in value if isinstance(value, list) else [value]:
                check_utf8(v if isinstance(v, str) else None, what)
    except DairError as e:
        _say("dair", f"error: {e}")
        return 2
    stdout = sys.stdout
    if not stdout.isatty():  # a terminal's errors end the session anyway; the dashboard needs it bare
        sys.stdout = _GuardedOutput(stdout)
    try:
        return run(args.func, args)
    finally:
        if isinstance(sys.stdout, _GuardedOutput):
            sys.stdout = stdout  # main() may be called again in this process (the tests do)


if __name__ == "__main__":
    raise SystemExit(main())
