"""Tool calls in a model's output, in the Hermes format (as vLLM's `hermes` parser reads it):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Parsed from a whole answer, or from a stream of text deltas (text outside the tags streams as content; each call is
sent once its closing tag arrives). For `tool_choice: "required"` or a named function the parser also gives the
structural tag (xgrammar's) that makes the model write exactly this format with arguments valid against the
tool's schema, so even a small model returns a valid call.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

START, END = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(START) + r"\s*(.*?)\s*" + re.escape(END), re.DOTALL)


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI returns it
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"

    def to_openai(self, index: int | None = None) -> dict:
        body = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return body if index is None else {"index": index, **body}


def _parse_call(body: str) -> ToolCall | None:
    """One call's JSON ({"name", "arguments"}); None when it is not one (the text stays content)."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    return ToolCall(value["name"], arguments if isinstance(arguments, str) else json.dumps(arguments))


class HermesToolParser:
    name = "hermes"

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a whole answer: the text before the first call is the content (None if empty)."""
        calls = []
        for match in _CALL.finditer(text):
            call = _parse_call(match.group(1))
            if call is None:
                return text, []  # a malformed call: the answer is returned as it is, as text
            calls.append(call)
        if not calls:
            return text, []
        content = text[: text.index(START)].strip()
        return content or None, calls

    def stream(self) -> HermesStream:
        return HermesStream()

    @staticmethod
    def structural_tag(tools: list[dict], parallel: bool) -> str:
        """The structural tag (JSON, for StructuredOutputsParams.structural_tag) of one or more calls of `tools`
        (OpenAI function tools), nothing else: what `tool_choice` "required" or a named function enforces."""
        tags = []
        for tool in tools:
            function = tool["function"]
            schema = function.get("parameters") or {"type": "object", "properties": {}}
            tags.append(
                {
                    "type": "tag",
                    "begin": f'{START}\n{{"name": {json.dumps(function["name"])}, "arguments": ',
                    # At most one whitespace character in a row: free whitespace lets a small model loop on it.
                    "content": {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": 1},
                    "end": f"}}\n{END}",
                }
            )
        fmt = {"type": "tags_with_separator", "tags": tags, "separator": "\n", "at_least_one": True}
        fmt["stop_after_first"] = not parallel
        return json.dumps({"type": "structural_tag", "format": fmt})


class HermesStream:
    """Incremental parsing: feed text deltas, get back the content to send and the calls completed."""

    def __init__(self) -> None:
        self.buffer = ""  # text not yet released: a possible start of a tag, or an open call
        self.calls: list[ToolCall] = []

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        self.buffer += delta
        content, done = "", []
        while True:
            start = self.buffer.find(START)
            if start < 0:
                keep = _partial_suffix(self.buffer, START)  # "<tool_c" might be the start of a tag
                content += self.buffer[: len(self.buffer) - keep]
                self.buffer = self.buffer[len(self.buffer) - keep :]
                break
            content += self.buffer[:start]
            self.buffer = self.buffer[start:]
            end = self.buffer.find(END)
            if end < 0:
                break  # the call is still being written
            body = self.buffer[len(START) : end]
            call = _parse_call(body.strip())
            if call is None:
                content += self.buffer[: end + len(END)]
            else:
                done.append(call)
            self.buffer = self.buffer[end + len(END) :]
        if (self.calls or done) and not content.strip():
            content = ""  # the separators between calls are not content
        self.calls += done
        return content, done

    def finish(self) -> str:
        """What is left at the end (an unclosed tag, a partial one): content, as it was written."""
        rest, self.buffer = self.buffer, ""
        return rest


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of text that is a proper start of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


TOOL_PARSERS = {HermesToolParser.name: HermesToolParser}
