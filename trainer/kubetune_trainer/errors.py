"""The exceptions that end a run with a given exit code and a TrainerError for the termination message."""

from __future__ import annotations

from kubetune_trainer.contract import EXIT_FAILED, EXIT_INVALID_INPUT, TrainerError


class TrainerFailure(Exception):
    """A run cannot go on; `exit_code` and `error` say why (the message names what to fix)."""

    exit_code = EXIT_FAILED

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        field: str | None = None,
        file: str | None = None,
        line: int | None = None,
    ) -> None:
        super().__init__(message)
        self.error = TrainerError(reason=reason, message=message, field=field, file=file, line=line)


class InvalidInput(TrainerFailure):
    """The config, data, model or storage location is wrong: retrying cannot help (exit 2)."""

    exit_code = EXIT_INVALID_INPUT
