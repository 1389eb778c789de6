"""One exception type for every user-facing problem, so the CLI can print it without a traceback."""


class MoePruneError(Exception):
    """A problem with the user's input or environment; the message names the problem and the fix."""


class BrokenConfig(MoePruneError):
    """config.json itself is wrong (a value of the wrong type, top-k outside 1..N): no reader may fall back to
    reading it another way (model-free apply reads config.json's dict when transformers cannot build the config)."""
