"""The one error type for mistakes a user can fix (a config value, a path, a file's content).

The entry points print a UserError as one line `error: ...` and exit 2; any other exception is a
bug or an environment failure and keeps its traceback (exit 1). Say what is wrong and how to fix
it in the message.
"""

import errno
import os
import re


class UserError(Exception):
    """A mistake in the command, the config or the files it names; the message is one line.

    `UserError(problem, problem, ...)` carries several problems (the validation pass reports all of
    them at once): the entry points print one `error:` line for each.
    """

    @property
    def problems(self) -> list[str]:
        return [str(p) for p in self.args] or [type(self).__name__]

    def __str__(self) -> str:
        return "; ".join(self.problems)


# What to do about a failed file operation, by errno: the remedy depends on the cause, not on the place.
_REMEDIES = {
    errno.ENOSPC: "free space",
    errno.EDQUOT: "free space or raise the quota",
    errno.EACCES: "make the directory writable by this user",
    errno.EPERM: "make the directory writable by this user",
    errno.EROFS: "use a directory on a writable filesystem",
    errno.ENOTDIR: "use a path whose parents are directories, not files",
    errno.EISDIR: "use a path that is not a directory",
    errno.ENOENT: "check the path",
}


def error_code(error: BaseException) -> int | None:
    """The errno of a failed file operation: the OSError's own or, for errors of libraries that wrap
    it (tensorstore, safetensors), an '[Errno N]' / 'OS error N' in the message; None if none."""
    code = getattr(error, "errno", None) if isinstance(error, OSError) else None
    if code is None and (m := re.search(r"errno (\d+)|os error (\d+)", str(error), re.IGNORECASE)):
        code = int(m.group(1) or m.group(2))
    return code


def remedy(error: BaseException) -> str:
    """What to do about a failed write ('free space', ...), by its error_code; '' if unknown. Under a GCS
    emulator (STORAGE_EMULATOR_HOST), tensorstore's 'Malformed StorageGeneration' names the emulator."""
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator and "Malformed StorageGeneration" in str(error):
        return (
            f"the GCS emulator at {emulator} sends no x-goog-generation header, which tensorstore needs to "
            "read what it wrote (the stock gcp-storage-emulator does not): serve the bucket with "
            "`python -m dmt_jax.storage_emulator` instead (README, Cloud storage)"
        )
    return _REMEDIES.get(error_code(error), "")


def os_error_message(error: OSError) -> str:
    """One line for an OSError: what failed, where, and what to do ('No space left on device: PATH; free
    space'), never a bare errno."""
    what = error.strerror or str(error) or type(error).__name__
    where = f": {error.filename}" if error.filename else ""
    fix = remedy(error)
    return f"{what}{where}" + (f"; {fix}" if fix else "")
