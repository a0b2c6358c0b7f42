"""User-facing errors.

Anything a user can cause by what they pass in (a missing file, a corrupt NIfTI, a
config typo) raises :class:`DiffCAError` with one line that names the file and the
problem. The CLI prints that line and exits non-zero without a traceback; every other
exception is a bug and keeps its traceback.
"""


class DiffCAError(Exception):
    """An expected, user-caused problem; ``str(err)`` is the one-line message."""


class InputError(DiffCAError):
    """Bad input data: missing, unreadable or inconsistent files."""


class ConfigError(DiffCAError):
    """A bad configuration file or option (unknown key, wrong type, bad value)."""
