"""Request pieces every surface shares: stop strings and mlserve's own ``mlserve`` body options."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict

MAX_STOP = 8
MAX_STOP_LEN = 256


def check_stops(value: str | list[str]) -> list[str]:
    """Stop strings as a list: at most MAX_STOP, each non-empty and at most MAX_STOP_LEN characters."""
    stops = [value] if isinstance(value, str) else value
    if len(stops) > MAX_STOP or any(not s or len(s) > MAX_STOP_LEN for s in stops):
        raise ValueError(f"at most {MAX_STOP} non-empty stop sequences of up to {MAX_STOP_LEN} characters")
    return stops


# A string or a list of strings on the wire; always a checked list once validated.
StopStrings = Annotated[str | list[str], AfterValidator(check_stops)]


class MlserveOptions(BaseModel):
    """mlserve's own request options, under the body's ``mlserve`` key (every surface)."""

    model_config = ConfigDict(extra="forbid")  # an option we silently ignored would be a lie

    deterministic: bool = False  # decoded alone: the same bytes under any load
    speculate: bool = True  # False: no prompt-lookup drafts for this request (served with --speculate)


def speculates(options: MlserveOptions | None) -> bool:
    """Whether a request lets the engine verify prompt-lookup drafts (the default)."""
    return options is None or options.speculate
