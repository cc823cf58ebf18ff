"""The one exception type vembed raises for mistakes a user can fix."""


class VembedError(Exception):
    """A user-facing error: the message names the file, line, key or value that is wrong.

    The CLI prints it as one line and exits non-zero; library users can catch it.
    """
