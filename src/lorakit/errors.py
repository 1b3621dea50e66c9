"""The exception types the CLI turns into a one-line message and a non-zero exit."""


class LorakitError(Exception):
    """A problem with the user's input: the message names the file:line, flag or field and what to do."""


class Interrupted(KeyboardInterrupt):
    """Training stopped on SIGINT/SIGTERM after finishing its step and writing a checkpoint; the message says
    how to resume. A KeyboardInterrupt, so code that stops on Ctrl-C stops on it; ``exit_code`` is the
    shell's 128 + signal number (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class ReportedElsewhere(LorakitError):
    """Raised on a rank of a distributed run whose error rank 0 prints: the CLI exits 2 without a second line."""
