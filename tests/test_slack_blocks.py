"""Buttons in Slack, the pure part: Block Kit out, block_actions payloads in, the replacement."""

from __future__ import annotations

import json
from typing import Any

from adapters.slack.blocks import (
    MAX_BUTTON_TEXT,
    Click,
    NotYours,
    actions_block,
    answer_blocks,
    chosen_message,
    click_to_inbound,
    parse_click,
    text_blocks,
)
from adapters.slack.convert import BotIdentity, Ignored, Inbound, event_to_inbound
from chatgateway.models import Action, ConversationKind, SessionKey, TenantId

TENANT = TenantId("acme")
BOT = BotIdentity("UBOT", "BBOT", "T1")
ACTIONS = (
    Action("Approve", "approve-42", "primary"),
    Action("Reject", "reject-42", "danger"),
    Action("Later", "later"),
)


def click_payload(
    blocks: list[dict[str, Any]],
    *,
    user: str = "UALICE",
    channel: str = "C1",
    message_ts: str = "1700000000.000200",
    thread_ts: str | None = "1700000000.000100",
    index: int = 1,
    text: str = "the answer",
) -> dict[str, Any]:
    """A block_actions payload as Slack sends it for a click on button `index` of `blocks`."""
    actions = next(b for b in blocks if b["type"] == "actions")
    button = actions["elements"][index - 1]
    message: dict[str, Any] = {
        "type": "message", "user": "UBOT", "bot_id": "BBOT", "text": text, "ts": message_ts,
        "blocks": blocks,
    }
    container: dict[str, Any] = {
        "type": "message", "message_ts": message_ts, "channel_id": channel, "is_ephemeral": False,
    }
    if thread_ts is not None:
        message["thread_ts"] = thread_ts
        container["thread_ts"] = thread_ts
    return {
        "type": "block_actions",
        "user": {"id": user, "username": user.lower(), "team_id": "T1"},
        "api_app_id": "A1",
        "team": {"id": "T1", "domain": "fake"},
        "container": container,
        "trigger_id": "123.456.abc",
        "channel": {"id": channel, "name": "directmessage" if channel.startswith("D") else "x"},
        "message": message,
        "response_url": "https://hooks.slack.com/actions/T1/1/x",
        "actions": [
            {
                "action_id": button["action_id"],
                "block_id": actions["block_id"],
                "text": button["text"],
                "value": button["value"],
                "style": button.get("style"),
                "type": "button",
                "action_ts": "1700000005.123456",
            }
        ],
    }


def test_actions_become_buttons_with_ids_values_and_styles() -> None:
    block = actions_block(ACTIONS, owner="UALICE")
    assert block["type"] == "actions"
    assert block["block_id"] == "cg_actions.UALICE"
    buttons = block["elements"]
    assert [b["action_id"] for b in buttons] == ["cg_action_1", "cg_action_2", "cg_action_3"]
    assert [b["value"] for b in buttons] == ["approve-42", "reject-42", "later"]
    assert buttons[0]["text"] == {
        "type": "plain_text", "text": "Approve", "emoji": True
    }
    assert [b.get("style") for b in buttons] == ["primary", "danger", None]
    # Valid JSON for the Web API.
    json.dumps(block)


def test_buttons_stay_within_slacks_limits() -> None:
    long = Action("x" * 200, "v" * 5000)
    many = tuple(Action(f"b{i}", str(i)) for i in range(30))
    button = actions_block((long,), owner=None)["elements"][0]
    assert len(button["text"]["text"]) == MAX_BUTTON_TEXT
    assert len(button["value"]) == 2000
    assert actions_block(many, owner=None)["block_id"] == "cg_actions"
    assert len(actions_block(many, owner=None)["elements"]) == 25


def test_text_blocks_split_sections_at_3000_characters() -> None:
    text = "\n\n".join(["word " * 300] * 4)  # ~6,000 characters
    sections = text_blocks(text, markdown=False)
    assert len(sections) >= 2
    assert all(s["type"] == "section" and len(s["text"]["text"]) <= 3000 for s in sections)
    assert text_blocks("**hi**", markdown=True) == [{"type": "markdown", "text": "**hi**"}]
    assert text_blocks("  ", markdown=False) == []


def test_answer_blocks_put_the_buttons_after_the_text() -> None:
    blocks = answer_blocks("Deploy?", ACTIONS[:2], owner="UALICE", markdown=False)
    assert [b["type"] for b in blocks] == ["section", "actions"]
    assert answer_blocks("Deploy?", (), owner="UALICE", markdown=False)[-1]["type"] == "section"


def mention_and_click(thread: str | None) -> tuple[Inbound, Inbound | NotYours]:
    body = {
        "event_id": "Ev1", "team_id": "T1",
        "event": {"type": "app_mention", "channel": "C1", "user": "UALICE",
                  "text": "<@UBOT> deploy?", "ts": "1700000000.000100",
                  **({"thread_ts": thread} if thread else {})},
    }
    asked = event_to_inbound(TENANT, body, BOT, app_name="support")
    assert isinstance(asked, Inbound)
    root = thread or "1700000000.000100"
    blocks = answer_blocks("Deploy?", ACTIONS, owner="UALICE", markdown=False)
    click = parse_click(click_payload(blocks, thread_ts=root, index=2))
    assert isinstance(click, Click)
    return asked, click_to_inbound(TENANT, click, app_name="support")


def test_a_click_in_a_thread_is_a_message_of_the_askers_session() -> None:
    asked, clicked = mention_and_click(None)
    assert isinstance(clicked, Inbound)
    message = clicked.message
    assert SessionKey.of(message) == SessionKey.of(asked.message)
    assert message.conversation.kind is ConversationKind.CHANNEL
    assert message.text == "reject-42"
    assert message.metadata["action"] == {
        "value": "reject-42", "label": "Reject", "index": 2, "via": "button"
    }
    assert message.metadata["slack"]["app"] == "support"
    assert message.message_id == "action:C1:1700000000.000200"
    # The agent's answer to the click goes into the same thread.
    assert clicked.target.channel == "C1"
    assert clicked.target.thread_ts == "1700000000.000100"


def test_a_click_in_a_later_thread_message_keeps_the_thread_session() -> None:
    asked, clicked = mention_and_click("1699999999.000001")
    assert isinstance(clicked, Inbound)
    assert SessionKey.of(clicked.message) == SessionKey.of(asked.message)


def test_a_click_in_a_dm_is_a_message_of_the_dm_session() -> None:
    body = {
        "event_id": "Ev2", "team_id": "T1",
        "event": {"type": "message", "channel_type": "im", "channel": "DALICE",
                  "user": "UALICE", "text": "deploy?", "ts": "1700000000.000100"},
    }
    asked = event_to_inbound(TENANT, body, BOT)
    assert isinstance(asked, Inbound)
    blocks = answer_blocks("Deploy?", ACTIONS, owner="UALICE", markdown=True)
    for thread in (None, "1700000000.000100"):  # posted in the DM, or streamed in a thread
        click = parse_click(click_payload(blocks, channel="DALICE", thread_ts=thread))
        assert isinstance(click, Click)
        clicked = click_to_inbound(TENANT, click)
        assert isinstance(clicked, Inbound)
        assert SessionKey.of(clicked.message) == SessionKey.of(asked.message)
        assert clicked.message.conversation.kind is ConversationKind.DM
        assert clicked.target.thread_ts == thread
        assert clicked.message.metadata["action"]["index"] == 1


def test_someone_elses_click_is_refused_not_put_in_their_session() -> None:
    blocks = answer_blocks("Deploy?", ACTIONS, owner="UALICE", markdown=False)
    click = parse_click(click_payload(blocks, user="UBOB"))
    assert isinstance(click, Click)
    result = click_to_inbound(TENANT, click)
    assert isinstance(result, NotYours)
    assert result.notice == "Only <@UALICE> can choose here."
    # Buttons without an owner (an answer whose user is unknown) are anyone's.
    blocks = answer_blocks("Deploy?", ACTIONS, owner=None, markdown=False)
    click = parse_click(click_payload(blocks, user="UBOB"))
    assert isinstance(click, Click)
    result = click_to_inbound(TENANT, click)
    assert isinstance(result, Inbound) and result.message.user.id == "UBOB"


def test_payloads_that_are_not_our_buttons_are_ignored() -> None:
    blocks = answer_blocks("Deploy?", ACTIONS, owner="UALICE", markdown=False)
    good = click_payload(blocks)
    assert not isinstance(parse_click(good), Ignored)
    cases: list[dict[str, Any]] = []
    other = json.loads(json.dumps(good))
    other["actions"][0]["action_id"] = "someone_elses_button"
    cases.append(other)
    foreign_block = json.loads(json.dumps(good))
    foreign_block["actions"][0]["block_id"] = "xyz"
    cases.append(foreign_block)
    select = json.loads(json.dumps(good))
    select["actions"][0]["type"] = "static_select"
    cases.append(select)
    no_user = json.loads(json.dumps(good))
    del no_user["user"]
    cases.append(no_user)
    no_value = json.loads(json.dumps(good))
    del no_value["actions"][0]["value"]
    cases.append(no_value)
    cases.append({**good, "type": "view_submission"})
    cases.append({**good, "actions": []})
    cases.append({"type": "block_actions", "actions": "nope", "user": 5, "channel": None})
    for payload in cases:
        assert isinstance(parse_click(payload), Ignored), payload


def test_after_a_click_the_buttons_are_replaced_by_the_choice() -> None:
    blocks = answer_blocks("Deploy *now*?", ACTIONS, owner="UALICE", markdown=False)
    click = parse_click(click_payload(blocks, index=2, text="Deploy *now*?"))
    assert not isinstance(click, Ignored)
    text, replaced = chosen_message(click)
    assert text == "Deploy *now*?"
    assert [b["type"] for b in replaced] == ["section", "context"]
    assert replaced[0] == blocks[0]
    assert replaced[1]["elements"][0]["text"] == "\u2713 *Reject* chosen by <@UALICE>"
    assert not any(b["type"] == "actions" for b in replaced)


def test_the_replacement_keeps_the_text_when_slack_sent_no_blocks() -> None:
    blocks = answer_blocks("x", (Action("A <b> & c", "v"),), owner=None, markdown=True)
    payload = click_payload(blocks, text="the answer")
    payload["message"]["blocks"] = []
    click = parse_click(payload)
    assert not isinstance(click, Ignored)
    text, replaced = chosen_message(click)
    assert text == "the answer"
    assert replaced[0] == {"type": "section", "text": {"type": "mrkdwn", "text": "the answer"}}
    assert replaced[-1]["elements"][0]["text"].startswith("\u2713 *A &lt;b&gt; &amp; c*")
