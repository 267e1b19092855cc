"""Errors caused by what the user gave (flags, files, data); entry scripts print them as one line and exit 2."""
from __future__ import annotations

import sys
from pathlib import Path


class UserError(Exception):
    """A bad value given by the user; the message is one line that names it and says what would be valid."""


class ConfigError(UserError, ValueError):
    """A bad flag, configuration file or combination of values."""


class DataError(UserError):
    """Missing or malformed data; the message names the file or directory."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message names the file and why."""


def run_cli(main, argv=None):
    """Run an entry script's main(); a UserError becomes `PROG: error: MESSAGE` on stderr and exit status 2."""
    try:
        return main(argv)
    except UserError as err:
        prog = Path(sys.argv[0]).name
        print(f"{prog}: error: {str(err).splitlines()[0]}", file=sys.stderr, flush=True)
        sys.exit(2)
