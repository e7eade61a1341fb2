"""The one exception tree of mlserve.

Every error a user can see is an ``MlserveError`` carrying a plain message, an
optional hint (what to do next) and the exit code the CLI uses::

    MlserveError                      exit 2 unless stated
    ├── UsageError                    bad flag or argument
    ├── NotFoundError                 unknown REF, model, recipe or file   (HTTP 404)
    ├── InvalidInputError             bad file or request                  (HTTP 400)
    │   ├── GGUFError                 not a valid GGUF file
    │   ├── RecipeError               recipe fails validation
    │   └── ArchiveError              unsafe or broken export tar
    ├── ConflictError                 version exists with other bytes, channel in use
    ├── IntegrityError                bytes do not match their sha256
    ├── SourceError                   a pull source failed (Hub down, 401/403, 404)
    ├── CheckFailed                   exit 1: the checked condition failed
    └── EngineError                   the engine cannot serve             (HTTP 503)

Per-request serving errors (overload, deadline, context overflow) live in
``mlserve.engine.api`` because only the server sees them.
"""

from __future__ import annotations


class MlserveError(Exception):
    """Base of every user-facing error: a message, a hint and an exit code."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} {self.hint}"


class UsageError(MlserveError):
    """A flag or argument is wrong."""


class NotFoundError(MlserveError):
    """A bundle, model, recipe or file does not exist."""


class InvalidInputError(MlserveError):
    """Input is malformed or out of range."""


class GGUFError(InvalidInputError):
    """A file is not a GGUF file llama.cpp can safely open."""


class RecipeError(InvalidInputError):
    """A recipe fails validation; the message names the field."""


class ArchiveError(InvalidInputError):
    """An export archive is unsafe or incomplete."""


class ConflictError(MlserveError):
    """The operation conflicts with what is stored."""


class IntegrityError(MlserveError):
    """Bytes do not match the sha256 they should have."""


class SourceError(MlserveError):
    """A pull source could not deliver the model."""


class CheckFailed(MlserveError):
    """The checked condition failed (verify, health, SLO, promotion gate)."""

    exit_code = 1


class EngineError(MlserveError):
    """The inference engine cannot serve (load failure, engine died)."""
