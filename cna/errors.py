"""Errors that the command line reports as one line, without a traceback."""


class CnaError(Exception):
    """A problem the user can fix; its message is the whole explanation."""


class ConfigError(CnaError):
    """A setting has a value outside what it accepts."""
