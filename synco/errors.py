"""User-facing errors: one short paragraph and a non-zero exit, never a bare traceback."""


class SyncoError(Exception):
    """An error caused by the user's input (data, config, checkpoint), reported without a traceback."""
