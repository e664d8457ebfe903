"""User-facing errors: one short paragraph and a non-zero exit, never a bare traceback."""

from typing import Callable, NoReturn


class SyncoError(Exception):
    """An error caused by the user's input (data, config, checkpoint), reported without a traceback."""

    exit_code = 2


def key_error(what: str, prefix: str = "") -> Callable[[str, str], NoReturn]:
    """The one form of a bad-setting error, naming the key: ``refuse = key_error("config key")`` and then
    ``refuse("epochs", "must be >= 1.")`` raises ``SyncoError("config key 'epochs': must be >= 1.")``."""

    def refuse(key: str, msg: str) -> NoReturn:
        raise SyncoError(f"{what} '{prefix}{key}': {msg}")

    return refuse


class Interrupted(KeyboardInterrupt):
    """The process was asked to stop (SIGINT / SIGTERM); exits 128 + the signal number, as a shell expects.

    A KeyboardInterrupt, not a SyncoError or an Exception: no ``except SyncoError`` / ``except Exception``
    on the way up may take it for a data or config problem and carry on."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + int(signum)
