"""The one exception type the command line turns into a clear, single-line error."""


class MedsslError(Exception):
    """A problem the user can fix: bad config, unreadable input, tampered weights.

    The message is printed as one line, so it should name the file or key at fault and say
    what to change.
    """


class ConfigError(MedsslError):
    """A config key is unknown, has the wrong type, or holds a value that cannot work."""
