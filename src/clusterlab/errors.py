"""Errors caused by what the user gave (flags, files, data); entry scripts print them as one line and exit 2."""
from __future__ import annotations

import errno
import os
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


# File-system failures a user can act on: reported as one line naming the file, like a UserError; {flag} is the
# program's flag for where it writes.
USER_OS_ERRORS = {errno.ENOSPC: "free some space or choose another {flag}",
                  errno.EDQUOT: "free some space or choose another {flag}",
                  errno.EROFS: "choose a writable {flag}",
                  errno.EACCES: "choose a directory you may write to",
                  errno.EPERM: "choose a directory you may write to",
                  errno.EEXIST: "a file, or a link to nowhere, stands where a folder is needed: choose another path",
                  errno.ENOTDIR: "a folder on that path is a file: choose another path",
                  errno.EISDIR: "that path is a folder: move it away or choose another path",
                  errno.ENAMETOOLONG: "a name on that path is too long: choose a shorter path",
                  errno.ELOOP: "symbolic links on that path lead in a circle: choose another path"}


def printable(text: str) -> str:
    """`text` as UTF-8 output can hold it. Python reads a file name's bytes that are not UTF-8 as lone surrogates
    (surrogateescape), which UTF-8 output, matplotlib and pandas refuse: they become \\xNN."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate of another origin (a JSON "\\ud800")
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def one_line(err: BaseException) -> str:
    """An exception as `Type: first line of its message`."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else 'no message'}"


def describe_os_error(err: OSError, output_flag: str = "--output_dir") -> str:
    where = f" {err.filename!r}" if err.filename else ""
    return f"cannot write{where}: {os.strerror(err.errno)} ({USER_OS_ERRORS[err.errno].format(flag=output_flag)})"


def run_cli(main, argv=None, output_flag: str = "--output_dir"):
    """Run an entry script's main(); a UserError (or a full disk, a read-only or forbidden directory, whose advice
    names `output_flag`) becomes `PROG: error: MESSAGE` on stderr and exit status 2; Ctrl-C becomes one line and
    exit status 130, as a shell reports it (a training run has recorded it in status.json by then)."""
    prog = Path(sys.argv[0]).name
    try:
        return main(argv)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted from the keyboard (Ctrl-C)", file=sys.stderr, flush=True)
        sys.exit(130)
    except UserError as err:
        message = str(err).splitlines()[0]
    except OSError as err:
        if err.errno not in USER_OS_ERRORS:
            raise
        message = describe_os_error(err, output_flag)
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)
