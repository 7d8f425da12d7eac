"""shardtune: distributed training of language models from one YAML config."""

__version__ = "0.1.0"


class ShardtuneError(Exception):
    """A user-facing error: one clear sentence naming the problem and the fix.

    The CLI prints it without a traceback; anything else is a bug.
    """
