"""DeepSeek-V4 chat format: conversation -> prompt text, and model output -> message.

The prompt layout follows the official V4 encoder as pinned down by the golden cases in
``shared/v4/encoding-tests`` (see ``tests/test_chat.py``):

* The prompt starts with BOS. System text is written bare (no role token); a ``tools`` list on the
  system (or developer) message appends a "## Tools" block describing the DSML call syntax and the
  JSON schemas of the tools.
* A user turn is ``<｜User｜>{text}``; when an assistant reply (or the generation) follows, it is
  closed by ``<｜Assistant｜>`` plus ``<think>`` (thinking mode, reasoning of the coming reply is
  rendered) or ``</think>`` (chat mode, or an earlier turn whose reasoning is dropped).
* An assistant turn is ``{reasoning}</think>{content}{\\n\\n DSML tool calls}<｜end▁of▁sentence｜>``;
  the ``{reasoning}</think>`` head is written only in thinking mode and only for turns after the last
  user turn, unless any message defines tools (then every turn keeps its reasoning).
* ``tool`` messages become ``<tool_result>…</tool_result>`` blocks of a user turn, merged with any
  adjacent tool results / user text (joined by a blank line) and ordered like the calls.
* ``developer`` renders like a user turn (it can carry tools); in thinking mode without tools a
  developer message before the last user turn is dropped.
* ``latest_reminder`` renders as ``<｜latest_reminder｜>{text}``.
* A ``task`` field on a message appends a quick-instruction token: ``action`` opens the assistant
  turn as ``<｜Assistant｜></think>|<think><｜action｜>``, every other task token goes right after the
  message (after EOS for an assistant message); the reply to a task never has a reasoning head.
* Reasoning effort "max" (thinking mode only) puts a fixed paragraph plus a blank line before the
  first message; effort "high" encodes exactly like plain thinking mode.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any, Mapping, Sequence

__all__ = [
    "BOS",
    "EOS",
    "USER",
    "ASSISTANT",
    "LATEST_REMINDER",
    "THINK_START",
    "THINK_END",
    "DSML",
    "TOOL_CALLS_START",
    "TOOL_CALLS_END",
    "TOOL_RESULT_START",
    "TOOL_RESULT_END",
    "TASK_TOKENS",
    "SPECIAL_TOKENS",
    "THINK_MAX_PARAGRAPH",
    "ROLES",
    "encode_messages",
    "encode_request",
    "parse_completion",
    "completion_to_message",
    "render_tools",
    "render_tool_calls",
    "normalize_thinking",
]

# ---------------------------------------------------------------------------------------------
# Special token strings (these are single tokens in the V4 tokenizer, except the tool_result tags)
# ---------------------------------------------------------------------------------------------

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
LATEST_REMINDER = "<｜latest_reminder｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"

TOOL_CALLS_START = f"<{DSML}tool_calls>"
TOOL_CALLS_END = f"</{DSML}tool_calls>"
INVOKE_END = f"</{DSML}invoke>"
PARAMETER_END = f"</{DSML}parameter>"
TOOL_RESULT_START = "<tool_result>"
TOOL_RESULT_END = "</tool_result>"

TASK_ACTION = "<｜action｜>"
TASK_QUERY = "<｜query｜>"
TASK_AUTHORITY = "<｜authority｜>"
TASK_DOMAIN = "<｜domain｜>"
TASK_TITLE = "<｜title｜>"
TASK_READ_URL = "<｜read_url｜>"

#: quick-instruction task name -> token
TASK_TOKENS: dict[str, str] = {
    "action": TASK_ACTION,
    "query": TASK_QUERY,
    "authority": TASK_AUTHORITY,
    "domain": TASK_DOMAIN,
    "title": TASK_TITLE,
    "read_url": TASK_READ_URL,
}

#: the V4 special tokens used by this format (BOS and EOS first), e.g. for a test tokenizer
SPECIAL_TOKENS: tuple[str, ...] = (
    BOS,
    EOS,
    USER,
    ASSISTANT,
    LATEST_REMINDER,
    THINK_START,
    THINK_END,
    DSML,
    *TASK_TOKENS.values(),
)

#: "Think Max" paragraph (reasoning effort "max"); a blank line separates it from what follows.
THINK_MAX_PARAGRAPH = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to "
    "resolve the root cause, rigorously stress-testing your logic against all potential paths, "
    "edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, "
    "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left "
    "unchecked."
)

ROLES = frozenset({"system", "user", "assistant", "tool", "developer", "latest_reminder"})
_USER_LIKE = ("user", "developer")

# Fixed text of the "## Tools" section (the DSML usage example shown to the model).
_TOOLS_INTRO = "\n".join(
    [
        "## Tools",
        "",
        "You have access to a set of tools to help answer the user's question. You can invoke tools "
        f'by writing a "{TOOL_CALLS_START}" block like the following:',
        "",
        TOOL_CALLS_START,
        f'<{DSML}invoke name="$TOOL_NAME">',
        f'<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE{PARAMETER_END}',
        "...",
        INVOKE_END,
        f'<{DSML}invoke name="$TOOL_NAME2">',
        "...",
        INVOKE_END,
        TOOL_CALLS_END,
        "",
        'String parameters should be specified as is and set `string="true"`. For all other types '
        "(numbers, booleans, arrays, objects), pass the value in JSON format and set "
        '`string="false"`.',
        "",
        f"If thinking_mode is enabled (triggered by {THINK_START}), you MUST output your complete "
        f"reasoning inside {THINK_START}...{THINK_END} BEFORE any tool calls or final response.",
        "",
        f"Otherwise, output directly after {THINK_END} with tool calls or final response.",
        "",
        "### Available Tool Schemas",
        "",
    ]
)
_TOOLS_OUTRO = "You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"

_RESPONSE_FORMAT_INTRO = (
    "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
)


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def _json(value: Any) -> str:
    """JSON text as the format writes it: default separators, non-ASCII kept as is."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return json.dumps(value, ensure_ascii=True, default=str)


def normalize_thinking(thinking: Any) -> str:
    """Map a thinking / reasoning-effort spec to one of ``"none"``, ``"high"``, ``"max"``.

    Accepts ``"none"``/``"chat"``/``"off"``/``False``/``None`` (chat mode), ``"high"``/``"thinking"``/
    ``"on"``/``True`` (thinking mode) and ``"max"`` (thinking mode with the Think Max paragraph).
    """
    if thinking is None or thinking is False:
        return "none"
    if thinking is True:
        return "high"
    if isinstance(thinking, str):
        key = thinking.strip().lower()
        if key in ("none", "chat", "off", "non-think", "nothink", "no_think", ""):
            return "none"
        if key in ("high", "thinking", "think", "on"):
            return "high"
        if key == "max":
            return "max"
    raise ValueError(
        f"invalid thinking mode {thinking!r}: expected 'none' (chat), 'high' (thinking) or 'max'"
    )


def _function_spec(tool: Mapping[str, Any]) -> Mapping[str, Any]:
    """OpenAI tool entry ``{"type": "function", "function": {...}}`` or a bare function spec."""
    if isinstance(tool, Mapping) and isinstance(tool.get("function"), Mapping):
        return tool["function"]
    if isinstance(tool, Mapping) and "name" in tool:
        return tool
    raise ValueError(f"cannot read tool definition {tool!r}: expected a function spec with a name")


def render_tools(tools: Sequence[Mapping[str, Any]]) -> str:
    """The "## Tools" section appended (after a blank line) to a system or developer message."""
    schemas = "\n".join(_json(dict(_function_spec(t))) for t in tools)
    return f"{_TOOLS_INTRO}\n{schemas}\n\n{_TOOLS_OUTRO}"


def _call_name_args(call: Mapping[str, Any]) -> tuple[str, dict]:
    fn = call.get("function") if isinstance(call.get("function"), Mapping) else call
    name = fn.get("name")
    if not isinstance(name, str):
        raise ValueError(f"tool call without a name: {call!r}")
    args = fn.get("arguments")
    if args is None or args == "":
        args = {}
    elif isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as exc:
            raise ValueError(f"tool call {name!r}: arguments are not valid JSON: {args!r}") from exc
        if args is None:
            args = {}
    if not isinstance(args, Mapping):
        raise ValueError(f"tool call {name!r}: arguments must be a JSON object, got {args!r}")
    return name, dict(args)


def _call_id(call: Mapping[str, Any]) -> str:
    cid = call.get("id")
    if not cid and isinstance(call.get("function"), Mapping):
        cid = call["function"].get("id")
    return cid or ""


def render_tool_calls(tool_calls: Sequence[Mapping[str, Any]]) -> str:
    """The DSML block for a list of calls (OpenAI form or ``{"name", "arguments"}``), no leading gap."""
    invokes = []
    for call in tool_calls:
        name, args = _call_name_args(call)
        params = []
        for key, value in args.items():
            if isinstance(value, str):
                params.append(f'<{DSML}parameter name="{key}" string="true">{value}{PARAMETER_END}')
            else:
                params.append(
                    f'<{DSML}parameter name="{key}" string="false">{_json(value)}{PARAMETER_END}'
                )
        invokes.append(f'<{DSML}invoke name="{name}">\n' + "\n".join(params) + f"\n{INVOKE_END}")
    return f"{TOOL_CALLS_START}\n" + "\n".join(invokes) + f"\n{TOOL_CALLS_END}"


def _text_of(content: Any, where: str) -> str:
    """Plain text of a message's content: a string, None, or a list of OpenAI text blocks."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        parts = []
        for block in content:
            if isinstance(block, str):
                parts.append(block)
            elif isinstance(block, Mapping) and block.get("type") == "text":
                parts.append(block.get("text") or "")
            else:
                kind = block.get("type") if isinstance(block, Mapping) else type(block).__name__
                raise ValueError(f"{where}: unsupported content block type {kind!r}")
        return "".join(parts)
    raise ValueError(f"{where}: content must be a string or a list of text blocks, got {content!r}")


def _tool_result_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        parts = []
        for block in content:
            if isinstance(block, Mapping) and block.get("type") == "text":
                parts.append(block.get("text") or "")
            elif isinstance(block, str):
                parts.append(block)
            else:
                kind = block.get("type") if isinstance(block, Mapping) else type(block).__name__
                parts.append(f"[Unsupported {kind}]")
        return "\n\n".join(parts)
    return _json(content)


# ---------------------------------------------------------------------------------------------
# Conversation preprocessing
# ---------------------------------------------------------------------------------------------


def _check_roles(messages: Sequence[Mapping[str, Any]]) -> None:
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise ValueError(f"message {i} is not a dict: {msg!r}")
        role = msg.get("role")
        if role not in ROLES:
            raise ValueError(
                f"message {i} has unknown role {role!r}; expected one of {sorted(ROLES)}"
            )
        task = msg.get("task")
        if task is not None and task not in TASK_TOKENS:
            raise ValueError(
                f"message {i} has unknown task {task!r}; expected one of {sorted(TASK_TOKENS)}"
            )


def _attach_tools(messages: list[dict], tools: Sequence[Mapping[str, Any]] | None) -> list[dict]:
    """Request-level tools belong to the leading system message (one is inserted if absent)."""
    if not tools:
        return messages
    if messages and messages[0].get("role") == "system" and not messages[0].get("tools"):
        messages[0] = {**messages[0], "tools": list(tools)}
    else:
        messages.insert(0, {"role": "system", "content": "", "tools": list(tools)})
    return messages


def _merge_user_turns(messages: list[dict]) -> list[dict]:
    """Fold tool messages (and user text adjacent to them) into single user turns.

    A user turn is represented with ``parts``: a list of ``(kind, text, call_id)`` with kind
    ``"text"`` or ``"tool"``. Consecutive tool results join the user turn before them (or start one);
    user text joins a preceding user turn unless that one carries a task.
    """
    merged: list[dict] = []
    for i, msg in enumerate(messages):
        role = msg["role"]
        prev = merged[-1] if merged else None
        if role == "tool":
            part = ("tool", _tool_result_text(msg.get("content")), msg.get("tool_call_id") or "")
            if prev is not None and "parts" in prev:
                prev["parts"].append(part)
                for key in ("task", "wo_eos"):
                    if key in msg:
                        prev[key] = msg[key]
            else:
                turn = {"role": "user", "parts": [part]}
                for key in ("task", "wo_eos"):
                    if key in msg:
                        turn[key] = msg[key]
                merged.append(turn)
        elif role == "user":
            part = ("text", _text_of(msg.get("content"), f"message {i} (user)"), "")
            if prev is not None and "parts" in prev and prev.get("task") is None:
                prev["parts"].append(part)
                if "task" in msg:
                    prev["task"] = msg["task"]
            else:
                turn = {k: v for k, v in msg.items() if k != "content"}
                turn["parts"] = [part]
                merged.append(turn)
        else:
            merged.append(dict(msg))
    return merged


def _order_tool_results(turns: list[dict]) -> None:
    """Reorder the tool-result parts of each user turn like the calls of the last assistant call."""
    order: dict[str, int] = {}
    for turn in turns:
        if turn["role"] == "assistant" and turn.get("tool_calls"):
            order = {}
            for idx, call in enumerate(turn["tool_calls"]):
                cid = _call_id(call)
                if cid:
                    order[cid] = idx
        elif "parts" in turn and order:
            tool_parts = [p for p in turn["parts"] if p[0] == "tool"]
            if len(tool_parts) > 1:
                ranked = iter(sorted(tool_parts, key=lambda p: order.get(p[2], 0)))
                turn["parts"] = [next(ranked) if p[0] == "tool" else p for p in turn["parts"]]


def _last_user_index(turns: Sequence[Mapping[str, Any]]) -> int:
    for idx in range(len(turns) - 1, -1, -1):
        if turns[idx]["role"] in _USER_LIKE:
            return idx
    return -1


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------


def _extras(msg: Mapping[str, Any]) -> str:
    out = ""
    if msg.get("tools"):
        out += "\n\n" + render_tools(msg["tools"])
    if msg.get("response_format"):
        out += "\n\n" + _RESPONSE_FORMAT_INTRO + _json(msg["response_format"])
    return out


def _reasoning_of(msg: Mapping[str, Any]) -> str:
    value = msg.get("reasoning_content")
    if value is None:
        value = msg.get("reasoning")
    return value or ""


def encode_messages(
    messages: Sequence[Mapping[str, Any]],
    *,
    thinking: Any = "none",
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool | str = True,
    drop_thinking: bool = True,
    add_bos: bool = True,
) -> str:
    """Render a conversation as V4 prompt text.

    Args:
      messages: dicts with ``role`` in system / user / assistant / tool / developer /
        latest_reminder. Assistant messages may carry ``reasoning_content`` (or ``reasoning``),
        ``content``, ``tool_calls`` (OpenAI form or ``{"name", "arguments"}``) and ``wo_eos``; tool
        messages ``content`` and ``tool_call_id``; system / developer messages ``tools`` and
        ``response_format``; any message a quick-instruction ``task`` (see ``TASK_TOKENS``).
      thinking: ``"none"`` (chat), ``"high"`` (thinking) or ``"max"`` (thinking + Think Max
        paragraph); see :func:`normalize_thinking` for accepted aliases.
      tools: request-level tool definitions; attached to the leading system message (a system
        message with empty text is inserted when there is none).
      add_generation_prompt: when the conversation ends with a user / developer / tool turn (or a
        message with a task), append the opening of the assistant reply (``<｜Assistant｜><think>``
        etc.). ``False`` leaves the last message's transition out. ``"auto"`` means ``True``.
      drop_thinking: drop reasoning of turns before the last user turn (thinking mode only; has no
        effect when any message defines tools).
      add_bos: start with BOS.

    Raises:
      ValueError: unknown role (named in the message), unknown task, malformed tool calls, or a
        developer message without content.
    """
    mode = normalize_thinking(thinking)
    is_thinking = mode != "none"
    if isinstance(add_generation_prompt, str):
        if add_generation_prompt != "auto":
            raise ValueError(f"add_generation_prompt must be a bool or 'auto', got {add_generation_prompt!r}")
        add_generation_prompt = True

    _check_roles(messages)
    msgs = _attach_tools([copy.deepcopy(dict(m)) for m in messages], tools)
    for i, msg in enumerate(msgs):
        if msg["role"] == "developer" and not _text_of(msg.get("content"), f"message {i}"):
            raise ValueError(f"message {i}: a developer message needs non-empty content")

    turns = _merge_user_turns(msgs)
    _order_tool_results(turns)

    keep_all_reasoning = (not drop_thinking) or any(m.get("tools") for m in turns)
    if is_thinking and not keep_all_reasoning:
        # earlier developer messages go away together with the reasoning of earlier turns
        last = _last_user_index(turns)
        turns = [m for i, m in enumerate(turns) if i >= last or m["role"] != "developer"]
    last_user = _last_user_index(turns)

    out = [BOS] if add_bos else []
    for i, msg in enumerate(turns):
        role = msg["role"]
        if i == 0 and mode == "max":
            out.append(THINK_MAX_PARAGRAPH + "\n\n")

        if role == "system":
            out.append(_text_of(msg.get("content"), f"turn {i} (system)") + _extras(msg))
        elif role == "developer":
            out.append(USER + _text_of(msg.get("content"), f"turn {i} (developer)") + _extras(msg))
        elif role == "user":
            pieces = [
                text if kind == "text" else f"{TOOL_RESULT_START}{text}{TOOL_RESULT_END}"
                for kind, text, _ in msg["parts"]
            ]
            out.append(USER + "\n\n".join(pieces))
        elif role == "latest_reminder":
            out.append(LATEST_REMINDER + _text_of(msg.get("content"), f"turn {i} (latest_reminder)"))
        else:  # assistant
            answers_task = i > 0 and turns[i - 1].get("task") is not None
            head = ""
            if is_thinking and not answers_task and (keep_all_reasoning or i > last_user):
                head = _reasoning_of(msg) + THINK_END
            calls = msg.get("tool_calls")
            tail = "\n\n" + render_tool_calls(calls) if calls else ""
            body = head + _text_of(msg.get("content"), f"turn {i} (assistant)") + tail
            out.append(body if msg.get("wo_eos") else body + EOS)

        # transition to what follows: only before an assistant / latest_reminder or at the end
        is_last = i + 1 == len(turns)
        if not is_last and turns[i + 1]["role"] not in ("assistant", "latest_reminder"):
            continue
        if is_last and not add_generation_prompt:
            continue
        task = msg.get("task")
        if task is not None:
            if task == "action":
                out.append(ASSISTANT + (THINK_START if is_thinking else THINK_END) + TASK_ACTION)
            else:
                out.append(TASK_TOKENS[task])
        elif role in _USER_LIKE:
            opens_reasoning = is_thinking and (keep_all_reasoning or i >= last_user)
            out.append(ASSISTANT + (THINK_START if opens_reasoning else THINK_END))
    return "".join(out)


def encode_request(obj: Mapping[str, Any] | Sequence[Mapping[str, Any]], *, thinking: Any = "none", **kwargs) -> str:
    """Encode a request object ``{"messages": [...], "tools": [...]}`` (or a bare message list).

    Top-level ``tools`` belong to the first (system) message, as in golden case 1. Keyword
    arguments go to :func:`encode_messages`.
    """
    if isinstance(obj, Mapping):
        if "messages" not in obj:
            raise ValueError("request object has no 'messages'")
        tools = obj.get("tools") or kwargs.pop("tools", None)
        return encode_messages(obj["messages"], thinking=thinking, tools=tools, **kwargs)
    return encode_messages(obj, thinking=thinking, **kwargs)


# ---------------------------------------------------------------------------------------------
# Parsing model output
# ---------------------------------------------------------------------------------------------

_INVOKE_RE = re.compile(
    re.escape(f"<{DSML}invoke") + r'\s+name="([^"]*)"\s*>(.*?)' + re.escape(INVOKE_END), re.DOTALL
)
_PARAM_RE = re.compile(
    re.escape(f"<{DSML}parameter")
    + r'\s+name="([^"]*)"\s+string="(true|false)"\s*>(.*?)'
    + re.escape(PARAMETER_END),
    re.DOTALL,
)


def _parse_tool_block(block: str) -> list[dict]:
    calls = []
    for inv in _INVOKE_RE.finditer(block):
        args: dict[str, Any] = {}
        for p in _PARAM_RE.finditer(inv.group(2)):
            name, is_str, raw = p.group(1), p.group(2), p.group(3)
            if is_str == "true":
                args[name] = raw
            else:
                try:
                    args[name] = json.loads(raw)
                except json.JSONDecodeError:
                    args[name] = raw  # malformed model output: keep the text
        calls.append({"name": inv.group(1), "arguments": args})
    return calls


def parse_completion(text: str, *, thinking: bool) -> dict:
    """Parse generated text (what follows the generation prompt) into a message.

    Returns ``{"reasoning_content": str, "content": str, "tool_calls": [{"name", "arguments"}]}``
    where arguments is a dict (``string="true"`` parameters raw, ``string="false"`` JSON-decoded).
    Text from the first EOS on is ignored. In thinking mode, reasoning runs up to ``</think>``
    (a leading ``<think>`` is tolerated); without ``</think>`` the whole text is reasoning (cut off
    mid-thought). The blank line that separates content from a DSML tool-call block is removed.
    Use ``thinking=False`` for replies to tasks (no reasoning head).
    """
    body = text
    eos = body.find(EOS)
    if eos >= 0:
        body = body[:eos]
    reasoning = ""
    if thinking:
        if body.startswith(THINK_START):
            body = body[len(THINK_START):]
        end = body.find(THINK_END)
        if end < 0:
            return {"reasoning_content": body, "content": "", "tool_calls": []}
        reasoning, body = body[:end], body[end + len(THINK_END):]
    elif body.startswith(THINK_END):
        body = body[len(THINK_END):]

    content, tool_calls = body, []
    start = body.find(TOOL_CALLS_START)
    if start >= 0:
        content = body[:start]
        if content.endswith("\n\n"):
            content = content[:-2]
        stop = body.find(TOOL_CALLS_END, start)
        block = body[start + len(TOOL_CALLS_START): stop if stop >= 0 else len(body)]
        tool_calls = _parse_tool_block(block)
    return {"reasoning_content": reasoning, "content": content, "tool_calls": tool_calls}


def completion_to_message(parsed: Mapping[str, Any]) -> dict:
    """An assistant message (for :func:`encode_messages`) from :func:`parse_completion` output."""
    msg: dict[str, Any] = {"role": "assistant", "content": parsed.get("content", "")}
    if parsed.get("reasoning_content"):
        msg["reasoning_content"] = parsed["reasoning_content"]
    if parsed.get("tool_calls"):
        msg["tool_calls"] = [
            {"name": c["name"], "arguments": dict(c["arguments"])} for c in parsed["tool_calls"]
        ]
    return msg
