"""The one exception type that reaches the user as a one-line message (exit status 2), and the disk errors
that are told the same way."""

import errno
import os
import re


class UserError(Exception):
    """Bad input the user can fix: printed as one line by run.py, never with a traceback."""


DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def not_a_file(shown: str, path: str | os.PathLike) -> UserError:
    """The error for a file option (`shown`, e.g. "config file x.yaml") whose path is not a file: missing, a folder,
    or something else such as a device."""
    why = ("is a folder, not a file" if os.path.isdir(path) else
           "is not a regular file" if os.path.exists(path) else "does not exist")
    return UserError(f"{shown} {why}")


def disk_error(e: Exception) -> str | None:
    """'cannot write ...' when `e` says the disk is full or read-only, else None: an OSError with that errno, or
    safetensors' SafetensorError, which wraps the OS error in its text ("... (os error 28)")."""
    if isinstance(e, OSError):
        return f"cannot write {e.filename or 'the output'}: {e.strerror}" if e.errno in DISK_ERRNOS else None
    code = re.search(r"\(os error (\d+)\)", str(e))
    if code and int(code[1]) in DISK_ERRNOS:
        return f"cannot write the output: {os.strerror(int(code[1]))}"
    return None
