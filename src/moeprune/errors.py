"""One exception type for every user-facing problem, so the CLI can print it without a traceback."""


class MoePruneError(Exception):
    """A problem with the user's input or environment; the message names the problem and the fix."""
