"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class LorakitError(Exception):
    """A problem with the user's input: the message names the file:line, flag or field and what to do."""
