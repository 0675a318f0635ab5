"""OpenAI request fields moeserve knows but does not support, and the values of each that ask for nothing we lack.

A request that sets one of them to anything else is refused with a 400 naming the field; fields nobody declared are
refused by the request models themselves (extra="forbid"). Nothing a client asks for is silently ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel


def _unset(value: Any) -> bool:
    return value is None


# field -> (does this value ask for nothing we lack?, why the field is refused otherwise)
CHAT: dict[str, tuple[Callable[[Any], bool], str]] = {
    "audio": (_unset, "audio output is not supported"),
    "function_call": (_unset, "the deprecated functions API is not supported: use tools and tool_choice"),
    "functions": (_unset, "the deprecated functions API is not supported: use tools and tool_choice"),
    "metadata": (_unset, "completions are not stored, so there is nothing to attach metadata to"),
    "modalities": (lambda v: v is None or list(v) == ["text"], "only text output is supported"),
    "moderation": (_unset, "moderation is not supported"),
    "prediction": (_unset, "predicted outputs are not supported"),
    "prompt_cache_key": (_unset, "the prefix cache is automatic and takes no key"),
    "prompt_cache_options": (_unset, "the prefix cache is automatic and takes no options"),
    "prompt_cache_retention": (_unset, "the prefix cache is automatic and takes no retention policy"),
    "reasoning_effort": (_unset, "reasoning effort is not supported"),
    "service_tier": (lambda v: v in (None, "auto", "default"), "there is one service tier"),
    "store": (lambda v: v in (None, False), "completions are not stored"),
    "verbosity": (_unset, "verbosity is not supported"),
    "web_search_options": (_unset, "web search is not supported"),
}

COMPLETION: dict[str, tuple[Callable[[Any], bool], str]] = {
    "suffix": (lambda v: not v, "suffix (insertion) is not supported"),
}


def refused_field(req: BaseModel, table: dict[str, tuple[Callable[[Any], bool], str]]) -> tuple[str, str] | None:
    """The first field of `req` set to a value we cannot honour, with the reason; None when there is none."""
    for name, (acceptable, why) in table.items():
        if not acceptable(getattr(req, name)):
            return name, why
    return None
