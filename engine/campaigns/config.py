"""A campaign's `config`: how fast it may send, how often it retries, when it gives up.

Unknown keys are refused rather than kept, so a typo ("max_attempt") is a 422 instead of
a setting that silently does nothing. The stored document always has the defaults
filled in, so the engine reads one complete shape and never guesses.
"""

from __future__ import annotations

from typing import Any

from engine.campaigns.checks import (
    Problems,
    is_integer,
    is_number,
    is_object,
    reject_unknown_keys,
)

DEFAULT_MAX_ATTEMPTS = 3
MAX_ATTEMPTS_RANGE = (1, 10)
DEFAULT_ERROR_THRESHOLD = {"rate": 0.2, "min_attempts": 100}
CONFIG_KEYS = ("rate_per_second", "max_attempts", "error_threshold")


def default_campaign_config() -> dict[str, Any]:
    return validate_campaign_config({})


def validate_campaign_config(raw: Any, prefix: str = "config") -> dict[str, Any]:
    """The config with defaults filled, or ValidationFailed naming each bad key.

    - rate_per_second: number > 0, optional (absent or null: only the deployment's
      per-channel rate applies);
    - max_attempts: integer 1-10, default 3;
    - error_threshold: {rate: 0-1, min_attempts: integer >= 1}, each part defaulting to
      {rate: 0.2, min_attempts: 100}.
    """
    problems = Problems()
    if raw is None:
        raw = {}
    if not is_object(raw):
        problems.add(prefix, "must be an object")
        problems.raise_if_any("invalid campaign config")
    reject_unknown_keys(problems, raw, CONFIG_KEYS, prefix)

    config: dict[str, Any] = {}
    rate = raw.get("rate_per_second")
    if rate is not None:
        if not is_number(rate) or rate <= 0:
            problems.add(f"{prefix}.rate_per_second", "must be a number greater than 0")
        else:
            config["rate_per_second"] = rate

    low, high = MAX_ATTEMPTS_RANGE
    attempts = raw.get("max_attempts", DEFAULT_MAX_ATTEMPTS)
    if not is_integer(attempts) or not low <= attempts <= high:
        problems.add(f"{prefix}.max_attempts", f"must be an integer from {low} to {high}")
    config["max_attempts"] = attempts

    config["error_threshold"] = _error_threshold(
        problems, raw.get("error_threshold", {}), f"{prefix}.error_threshold"
    )
    problems.raise_if_any("invalid campaign config")
    return config


def _error_threshold(problems: Problems, raw: Any, prefix: str) -> dict[str, Any]:
    if not is_object(raw):
        problems.add(prefix, "must be an object")
        return dict(DEFAULT_ERROR_THRESHOLD)
    reject_unknown_keys(problems, raw, DEFAULT_ERROR_THRESHOLD, prefix)
    rate = raw.get("rate", DEFAULT_ERROR_THRESHOLD["rate"])
    if not is_number(rate) or not 0 <= rate <= 1:
        problems.add(f"{prefix}.rate", "must be a number from 0 to 1")
    minimum = raw.get("min_attempts", DEFAULT_ERROR_THRESHOLD["min_attempts"])
    if not is_integer(minimum) or minimum < 1:
        problems.add(f"{prefix}.min_attempts", "must be an integer of at least 1")
    return {"rate": rate, "min_attempts": minimum}
