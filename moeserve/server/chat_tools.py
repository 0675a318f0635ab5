"""What a chat request's `tools` and `tool_choice` ask of the engine, decided before it is queued.

    tool_choice   template gets tools   output parsed for calls          constrained
    none          no                    no                               no
    auto          yes                   yes (needs --tool-call-parser)   no
    required      yes                   yes                              one or more calls of the tools
    {function}    yes                   yes                              one call of that function

`auto` is the default when tools are given, as OpenAI's. `required` and a named function are enforced with a
structural tag (structured outputs), so the answer is a valid call whatever the model; `parallel_tool_calls: false`
allows one call only.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeserve.engine.sampling_params import StructuredOutputsParams
from moeserve.server.errors import APIError
from moeserve.server.tool_parser import TOOL_PARSERS, HermesToolParser


@dataclass
class ToolPlan:
    template_tools: list[dict] | None  # what the chat template renders (None: no tools in the prompt)
    parser: HermesToolParser | None  # parses calls out of the answer (None: the answer is text)
    constraint: StructuredOutputsParams | None  # the structural tag that forces calls
    parallel: bool  # more than one call may be returned


def plan_tools(req, parser_name: str | None, template_renders_tools: bool, constrained: bool) -> ToolPlan:
    """The plan for a ChatCompletionRequest (`constrained`: it has a structured-output constraint of its own); 400
    naming the field for what cannot be honoured."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise APIError(400, "tool_choice: no tools were given to choose from", "tool_choice")
        return ToolPlan(None, None, None, req.parallel_tool_calls)
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    if choice is None:
        choice = "auto"
    if choice == "none":
        return ToolPlan(None, None, None, req.parallel_tool_calls)
    if choice == "auto" and parser_name is None:
        raise APIError(
            400, 'tool_choice: "auto" needs the server started with --tool-call-parser (hermes)', "tool_choice"
        )
    if not template_renders_tools:
        raise APIError(400, "tools: this model's chat template does not render tools", "tools")
    parser = TOOL_PARSERS[parser_name or HermesToolParser.name]()
    if choice == "auto":
        return ToolPlan(tools, parser, None, req.parallel_tool_calls)
    forced = tools
    parallel = req.parallel_tool_calls
    if choice != "required":
        forced = [t for t in tools if t["function"]["name"] == choice.function.name]
        if not forced:
            raise APIError(400, f"tool_choice: no tool named {choice.function.name!r} was given", "tool_choice")
        parallel = False
    if constrained:
        raise APIError(400, "response_format: a required tool call is already a constraint", "response_format")
    tag = parser.structural_tag(forced, parallel)
    return ToolPlan(tools, parser, StructuredOutputsParams(structural_tag=tag), parallel)
