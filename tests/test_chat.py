"""Chat format: official golden cases (byte-exact) plus hand-written cases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from v4jax.chat import (
    ASSISTANT,
    BOS,
    DSML,
    EOS,
    LATEST_REMINDER,
    TASK_TOKENS,
    THINK_END,
    THINK_MAX_PARAGRAPH,
    THINK_START,
    TOOL_CALLS_START,
    USER,
    completion_to_message,
    encode_messages,
    encode_request,
    parse_completion,
)

GOLDEN_DIR = Path(__file__).resolve().parents[2] / "shared" / "v4" / "encoding-tests"
# mode of each golden case (README table: 1-3 thinking, 4 chat, 5 thinking with effort "max")
GOLDEN_MODES = {1: "high", 2: "high", 3: "high", 4: "none", 5: "max"}


def _golden(n: int):
    inp, out = GOLDEN_DIR / f"test_input_{n}.json", GOLDEN_DIR / f"test_output_{n}.txt"
    if not (inp.is_file() and out.is_file()):
        pytest.skip(f"golden case {n} not available under {GOLDEN_DIR}")
    return json.loads(inp.read_text(encoding="utf-8")), out.read_bytes()


@pytest.mark.parametrize("n", sorted(GOLDEN_MODES))
def test_golden_byte_exact(n):
    obj, expected = _golden(n)
    got = encode_request(obj, thinking=GOLDEN_MODES[n])
    assert got.encode("utf-8") == expected


def test_golden_thinking_aliases():
    obj, expected = _golden(2)
    for mode in ("high", "thinking", True):
        assert encode_request(obj, thinking=mode).encode("utf-8") == expected


def _turn_after(prompt: str, start: int) -> str:
    """Completion text of the assistant turn opened at ``start`` (up to the next user turn)."""
    opener = ASSISTANT + THINK_START
    assert prompt.startswith(opener, start)
    begin = start + len(opener)
    stop = prompt.find(USER, begin)
    return prompt[begin:] if stop < 0 else prompt[begin:stop]


def test_golden_case1_parse():
    obj, expected = _golden(1)
    prompt = expected.decode("utf-8")
    opener = ASSISTANT + THINK_START
    first = _turn_after(prompt, prompt.index(opener))
    parsed = parse_completion(first, thinking=True)
    assert parsed["reasoning_content"] == (
        "The user wants to know the weather in Beijing. I should use the get_weather tool."
    )
    assert parsed["content"] == ""
    assert parsed["tool_calls"] == [
        {"name": "get_weather", "arguments": {"location": "Beijing", "unit": "celsius"}}
    ]

    last = _turn_after(prompt, prompt.rindex(opener))
    parsed = parse_completion(last, thinking=True)
    assert parsed["reasoning_content"] == "Got the weather data. Let me format a nice response."
    assert "22°C" in parsed["content"]
    assert parsed["tool_calls"] == []


def test_golden_case2_parse():
    _, expected = _golden(2)
    prompt = expected.decode("utf-8")
    last = _turn_after(prompt, prompt.rindex(ASSISTANT + THINK_START))
    parsed = parse_completion(last, thinking=True)
    assert parsed == {
        "reasoning_content": "The user asks about the capital of France. It is Paris.",
        "content": "The capital of France is Paris.",
        "tool_calls": [],
    }


def test_golden_case3_parse_search_call():
    _, expected = _golden(3)
    prompt = expected.decode("utf-8")
    opener = ASSISTANT + THINK_START
    parsed = parse_completion(_turn_after(prompt, prompt.index(opener)), thinking=True)
    assert parsed["content"] == ""
    assert [c["name"] for c in parsed["tool_calls"]] == ["search"]
    assert parsed["tool_calls"][0]["arguments"]["queries"].startswith("小柴胡")


# ---------------------------------------------------------------------------------------------
# Hand-written cases
# ---------------------------------------------------------------------------------------------

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Look things up",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
    },
}


def test_chat_single_turn():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    assert encode_messages(msgs, thinking="none") == (
        f"{BOS}Be brief.{USER}Hi there{ASSISTANT}{THINK_END}"
    )
    # thinking modes open a reasoning block instead
    assert encode_messages(msgs, thinking="high").endswith(f"{USER}Hi there{ASSISTANT}{THINK_START}")
    # no generation prompt on request
    assert encode_messages(msgs, add_generation_prompt=False) == f"{BOS}Be brief.{USER}Hi there"


def test_chat_mode_ignores_reasoning():
    msgs = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "reasoning_content": "secret", "content": "a1"},
        {"role": "user", "content": "q2"},
    ]
    got = encode_messages(msgs, thinking="none")
    assert got == f"{BOS}{USER}q1{ASSISTANT}{THINK_END}a1{EOS}{USER}q2{ASSISTANT}{THINK_END}"


def test_multi_turn_reasoning_dropped_without_tools():
    msgs = [
        {"role": "user", "content": "one"},
        {"role": "assistant", "reasoning_content": "r-one", "content": "A"},
        {"role": "user", "content": "two"},
        {"role": "assistant", "reasoning_content": "r-two", "content": "B"},
        {"role": "user", "content": "three"},
    ]
    got = encode_messages(msgs, thinking="high")
    assert got == (
        f"{BOS}{USER}one{ASSISTANT}{THINK_END}A{EOS}"
        f"{USER}two{ASSISTANT}{THINK_END}B{EOS}"
        f"{USER}three{ASSISTANT}{THINK_START}"
    )
    assert "r-one" not in got and "r-two" not in got
    # the turn after the last user message keeps its reasoning
    done = encode_messages(msgs + [{"role": "assistant", "reasoning_content": "r3", "content": "C"}],
                           thinking="high")
    assert done.endswith(f"{USER}three{ASSISTANT}{THINK_START}r3{THINK_END}C{EOS}")
    # drop_thinking=False keeps all reasoning
    kept = encode_messages(msgs, thinking="high", drop_thinking=False)
    assert f"{ASSISTANT}{THINK_START}r-one{THINK_END}A{EOS}" in kept


def test_reasoning_kept_when_tools_defined():
    msgs = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "one"},
        {"role": "assistant", "reasoning_content": "r-one", "content": "A"},
        {"role": "user", "content": "two"},
    ]
    got = encode_messages(msgs, thinking="high", tools=[WEATHER_TOOL])
    assert got.startswith(f"{BOS}sys\n\n## Tools\n\n")
    assert '{"name": "lookup", "description": "Look things up"' in got
    assert f"{USER}one{ASSISTANT}{THINK_START}r-one{THINK_END}A{EOS}" in got
    assert got.endswith(f"{USER}two{ASSISTANT}{THINK_START}")


def test_tools_without_system_message_get_one():
    got = encode_messages([{"role": "user", "content": "x"}], thinking="none", tools=[WEATHER_TOOL])
    assert got.startswith(f"{BOS}\n\n## Tools\n\n")
    assert got.endswith("invoke tool calls.\n" + f"{USER}x{ASSISTANT}{THINK_END}")


def test_tool_call_and_results_round_trip():
    args_a = {"city": "Zürich 北京", "days": 3, "metric": True, "tags": ["a", "b"], "opts": {"x": None}}
    args_b = {"q": "line1\nline2 \"quoted\""}
    msgs = [
        {"role": "system", "content": "sys", "tools": [WEATHER_TOOL]},
        {"role": "user", "content": "go"},
        {
            "role": "assistant",
            "reasoning_content": "need two calls",
            "content": "Calling.",
            "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": "weather", "arguments": json.dumps(args_a)}},
                {"id": "c2", "type": "function",
                 "function": {"name": "lookup", "arguments": json.dumps(args_b)}},
            ],
        },
        # results arrive out of order: the encoder puts them in call order
        {"role": "tool", "tool_call_id": "c2", "content": "R2"},
        {"role": "tool", "tool_call_id": "c1", "content": "R1"},
        {"role": "user", "content": "and then?"},
    ]
    prompt = encode_messages(msgs, thinking="high")
    assert (f"{USER}<tool_result>R1</tool_result>\n\n<tool_result>R2</tool_result>\n\nand then?"
            f"{ASSISTANT}{THINK_START}") in prompt
    assert f'<{DSML}parameter name="days" string="false">3</{DSML}parameter>' in prompt
    assert f'<{DSML}parameter name="city" string="true">Zürich 北京</{DSML}parameter>' in prompt
    assert f"Calling.\n\n{TOOL_CALLS_START}\n" in prompt

    start = prompt.index(ASSISTANT + THINK_START) + len(ASSISTANT + THINK_START)
    completion = prompt[start: prompt.index(USER, start)]
    assert completion.endswith(EOS)
    parsed = parse_completion(completion, thinking=True)
    assert parsed == {
        "reasoning_content": "need two calls",
        "content": "Calling.",
        "tool_calls": [{"name": "weather", "arguments": args_a},
                       {"name": "lookup", "arguments": args_b}],
    }
    # re-encoding the parsed message (call ids put back for result ordering) reproduces the prompt
    again = completion_to_message(parsed)
    for call, cid in zip(again["tool_calls"], ("c1", "c2")):
        call["id"] = cid
    msgs2 = msgs[:2] + [again] + msgs[3:]
    assert encode_messages(msgs2, thinking="high") == prompt


def test_parse_edge_cases():
    # no EOS yet, chat mode
    assert parse_completion("hello", thinking=False) == {
        "reasoning_content": "", "content": "hello", "tool_calls": []}
    # cut off while reasoning
    assert parse_completion("still thinking", thinking=True)["reasoning_content"] == "still thinking"
    # leading <think> tolerated, text after EOS ignored
    got = parse_completion(f"{THINK_START}r{THINK_END}c{EOS}junk", thinking=True)
    assert got == {"reasoning_content": "r", "content": "c", "tool_calls": []}
    # string="false" values are JSON
    text = (f"{THINK_END}\n\n{TOOL_CALLS_START}\n<{DSML}invoke name=\"f\">\n"
            f'<{DSML}parameter name="n" string="false">[1, 2.5, {{"k": false}}]</{DSML}parameter>\n'
            f'<{DSML}parameter name="s" string="true">[1, 2]</{DSML}parameter>\n'
            f"</{DSML}invoke>\n</{DSML}tool_calls>{EOS}")
    got = parse_completion(text, thinking=False)
    assert got["tool_calls"] == [{"name": "f", "arguments": {"n": [1, 2.5, {"k": False}], "s": "[1, 2]"}}]
    assert got["content"] == ""


def test_think_max_paragraph_placement():
    msgs = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "u"}]
    got = encode_messages(msgs, thinking="max")
    assert got == f"{BOS}{THINK_MAX_PARAGRAPH}\n\nSYS{USER}u{ASSISTANT}{THINK_START}"
    assert THINK_MAX_PARAGRAPH.startswith("Reasoning Effort: Absolute maximum")
    # without a system message it goes right before the first user turn
    got = encode_messages(msgs[1:], thinking="max")
    assert got == f"{BOS}{THINK_MAX_PARAGRAPH}\n\n{USER}u{ASSISTANT}{THINK_START}"
    # "high" is plain thinking mode
    assert "Reasoning Effort" not in encode_messages(msgs, thinking="high")


def test_latest_reminder_and_developer():
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "latest_reminder", "content": "today"},
        {"role": "developer", "content": "D"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "U"},
    ]
    assert encode_messages(msgs, thinking="none") == (
        f"{BOS}S{LATEST_REMINDER}today{USER}D{ASSISTANT}{THINK_END}ok{EOS}{USER}U{ASSISTANT}{THINK_END}"
    )
    # thinking mode without tools: an earlier developer message is dropped with the old reasoning
    assert encode_messages(msgs, thinking="high") == (
        f"{BOS}S{LATEST_REMINDER}todayok{EOS}{USER}U{ASSISTANT}{THINK_START}"
    )
    with pytest.raises(ValueError, match="developer"):
        encode_messages([{"role": "developer", "content": ""}])


def test_task_tokens():
    msgs = [{"role": "user", "content": "find x", "task": "action"}]
    assert encode_messages(msgs, thinking="high") == (
        f"{BOS}{USER}find x{ASSISTANT}{THINK_START}{TASK_TOKENS['action']}"
    )
    answered = msgs + [{"role": "assistant", "content": "Search", "reasoning_content": "ignored"}]
    assert encode_messages(answered, thinking="high").endswith(f"{TASK_TOKENS['action']}Search{EOS}")
    titled = [{"role": "user", "content": "q"},
              {"role": "assistant", "content": "a", "task": "title"}]
    assert encode_messages(titled, thinking="none").endswith(f"a{EOS}{TASK_TOKENS['title']}")
    with pytest.raises(ValueError, match="bogus"):
        encode_messages([{"role": "user", "content": "q", "task": "bogus"}])


def test_unknown_role_is_named():
    with pytest.raises(ValueError, match="narrator"):
        encode_messages([{"role": "user", "content": "hi"}, {"role": "narrator", "content": "x"}])


def test_invalid_thinking_mode():
    with pytest.raises(ValueError, match="thinking"):
        encode_messages([{"role": "user", "content": "hi"}], thinking="medium")
