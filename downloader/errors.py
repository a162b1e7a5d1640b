"""The named errors imgdl raises on purpose.

Everything a *user* can get wrong (a config key, a flag, an unreadable input
file) is an :class:`ImgdlError`; the CLI turns it into one line on stderr and
exit code 2. Anything else escaping to the top is a bug and keeps its
traceback.
"""


class ImgdlError(Exception):
    """Base of the errors that are the user's to fix, not ours."""


class ConfigError(ImgdlError):
    """A setting is unknown or has a bad value; the message names key and source."""


class InputError(ImgdlError):
    """An input list cannot be opened or read at all (a bad *line* is an outcome)."""


class UnsafeNameError(ImgdlError):
    """A file name (template or name column) would leave the output folder."""
