"""Buttons on Discord answers and clicks on them (adapters/discord/components.py), on payloads
shaped like Discord's and on Interactions parsed by discord.py itself."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import discord
import pytest

from adapters.discord import components
from adapters.discord.components import (
    MAX_CUSTOM_ID,
    STYLE_DANGER,
    STYLE_PRIMARY,
    STYLE_SECONDARY,
    STYLE_SUCCESS,
    ButtonRef,
    action_rows,
    chosen_rows,
    click_of,
    custom_id,
    parse_click,
    parse_custom_id,
    value_of,
)
from adapters.discord.convert import to_normalized as message_to_normalized
from chatgateway.models import Action, ConversationKind, Role, SessionKey, TenantId, Turn
from tests.test_discord_convert import ALICE, BOT, CAROL, CHANNEL, GUILD, THREAD, message, state

TENANT = TenantId("acme")
INTERACTION = "790000000000000001"
ANSWER = "790000000000000002"
APPROVE = Action("Approve", "approve-42", "primary")
REJECT = Action("Reject", "reject-42", "danger")
LATER = Action("Later", "later")


def click_payload(custom: str, *, user: dict[str, Any] = ALICE, guild: bool = True,
                  channel: dict[str, Any] | None = None,
                  rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """An INTERACTION_CREATE (component) as Discord sends it."""
    payload: dict[str, Any] = {
        "id": INTERACTION, "application_id": "700000000000000009", "type": 3,
        "token": "interaction-token", "version": 1, "attachment_size_limit": 10485760,
        "data": {"custom_id": custom, "component_type": 2},
        "channel_id": (channel or {}).get("id", CHANNEL),
        "channel": channel or {"id": CHANNEL, "type": 0 if guild else 1, "name": "general"},
        "message": {
            "id": ANSWER, "channel_id": CHANNEL, "author": {**ALICE, "id": str(BOT)},
            "content": "Shall I?", "timestamp": "2026-01-01T00:00:00+00:00",
            "edited_timestamp": None, "tts": False, "mention_everyone": False,
            "mentions": [], "mention_roles": [], "attachments": [], "embeds": [],
            "pinned": False, "type": 0,
            "components": rows if rows is not None else action_rows([APPROVE, REJECT],
                                                                    ALICE["id"]),
        },
    }
    if guild:
        payload["guild_id"] = GUILD
        payload["member"] = {"user": user, "roles": [], "joined_at": "2026-01-01T00:00:00+00:00",
                             "deaf": False, "mute": False, "flags": 0, "permissions": "0",
                             "nick": None}
    else:
        payload["user"] = user
    return payload


def test_actions_become_a_row_of_buttons_with_styles_and_ids() -> None:
    rows = action_rows([APPROVE, REJECT, LATER], ALICE["id"])
    assert len(rows) == 1 and rows[0]["type"] == 1
    buttons = rows[0]["components"]
    assert [b["label"] for b in buttons] == ["Approve", "Reject", "Later"]
    assert [b["style"] for b in buttons] == [STYLE_PRIMARY, STYLE_DANGER, STYLE_SECONDARY]
    assert [b["type"] for b in buttons] == [2, 2, 2]
    refs = [parse_custom_id(b["custom_id"]) for b in buttons]
    assert refs == [ButtonRef(ALICE["id"], 1, "approve-42"), ButtonRef(ALICE["id"], 2, "reject-42"),
                    ButtonRef(ALICE["id"], 3, "later")]
    assert len({b["custom_id"] for b in buttons}) == 3


def test_more_than_five_buttons_take_more_rows() -> None:
    actions = [Action(f"Option {i}", f"v{i}") for i in range(1, 8)]
    rows = action_rows(actions, ALICE["id"])
    assert [len(r["components"]) for r in rows] == [5, 2]


def test_a_long_value_is_carried_as_a_digest_within_100_characters() -> None:
    value = "x" * 2000
    made = custom_id(ALICE["id"], 5, value)
    assert len(made) <= MAX_CUSTOM_ID and made.startswith("cg1h:")
    ref = parse_custom_id(made)
    assert ref is not None and ref.value is None and ref.index == 5
    assert ref.matches(value) and not ref.matches(value + "y")
    # A value that fits is carried as it is, colons and all.
    short = custom_id(ALICE["id"], 1, "a:b:c")
    assert parse_custom_id(short) == ButtonRef(ALICE["id"], 1, "a:b:c")


@pytest.mark.parametrize("raw", [
    None, "", "other-app:button", "cg1:alice:1:v", "cg1:1:x:v", "cg1:1:0:v", "cg1:1:26:v",
    "cg1h:1:1:", "cg1:1:1", "x" * 101,
])
def test_custom_ids_not_made_by_the_gateway_are_refused(raw: Any) -> None:
    assert parse_custom_id(raw) is None


def test_the_digest_resolves_to_the_latest_answer_with_that_value() -> None:
    long_value = "approve:" + "y" * 200
    ref = parse_custom_id(custom_id(ALICE["id"], 2, long_value))
    assert ref is not None
    wanted = Action("Approve", long_value)
    history = [
        Turn(Role.AGENT, "old", 1.0, actions=(REJECT, wanted)),
        Turn(Role.USER, "hm", 2.0),
        Turn(Role.AGENT, "new", 3.0, actions=(APPROVE, REJECT)),
    ]
    assert value_of(ref, history) == wanted
    assert value_of(ref, history[1:]) is None


def test_after_a_click_every_button_is_disabled_and_the_choice_marked() -> None:
    rows = action_rows([APPROVE, REJECT], ALICE["id"])
    chosen = rows[0]["components"][1]["custom_id"]
    after = chosen_rows(rows, chosen)
    buttons = after[0]["components"]
    assert all(b["disabled"] for b in buttons)
    assert buttons[1]["label"] == "✓ Reject" and buttons[1]["style"] == STYLE_SUCCESS
    assert buttons[0]["label"] == "Approve" and buttons[0]["style"] == STYLE_PRIMARY
    # The original is left as it was; marking twice does not mark twice.
    assert "disabled" not in rows[0]["components"][0]
    assert chosen_rows(after, chosen) == after


async def test_the_view_discord_py_sends_is_the_same_components() -> None:
    rows = chosen_rows(action_rows([APPROVE, REJECT, LATER], ALICE["id"]),
                       custom_id(ALICE["id"], 1, APPROVE.value))
    view = components.view(rows)
    assert view.is_finished()  # not kept by discord.py to dispatch clicks to
    assert view.to_components() == rows


def test_a_click_in_a_channel_is_a_message_of_the_users_session_there() -> None:
    custom = custom_id(ALICE["id"], 2, REJECT.value)
    click = parse_click(click_payload(custom))
    assert click is not None and click.allowed()
    assert click.label == "Reject" and click.message_id == ANSWER and not click.dm
    value = click.ref.value
    assert value == REJECT.value
    normalized = components.to_normalized(click, value, TENANT, bot_name="support")
    original = message_to_normalized(message("hi"), TENANT, bot_id=BOT, via="mention",
                                     bot_name="support")
    assert SessionKey.of(normalized) == SessionKey.of(original)
    assert normalized.text == "reject-42"
    assert normalized.message_id == INTERACTION
    assert normalized.metadata["action"] == {
        "value": "reject-42", "label": "Reject", "index": 2, "via": "button"}
    assert normalized.metadata["via"] == "button"
    assert normalized.metadata["guildId"] == GUILD
    assert normalized.timestamp > 1_400_000_000


def test_a_click_in_a_dm_and_in_a_thread_keep_their_sessions() -> None:
    custom = custom_id(ALICE["id"], 1, APPROVE.value)
    dm = parse_click(click_payload(custom, guild=False, channel={"id": "2001", "type": 1}))
    assert dm is not None and dm.dm
    normalized = components.to_normalized(dm, APPROVE.value, TENANT, bot_name="support")
    original = message_to_normalized(message("hi", guild=False, channel_id="2001"), TENANT,
                                     bot_id=BOT, via="dm", bot_name="support")
    assert normalized.conversation.kind is ConversationKind.DM
    assert SessionKey.of(normalized) == SessionKey.of(original)

    thread = parse_click(click_payload(custom, channel={
        "id": THREAD, "type": 11, "parent_id": CHANNEL, "name": "a thread"}))
    assert thread is not None
    in_thread = components.to_normalized(thread, APPROVE.value, TENANT, bot_name="support")
    st = state(with_guild=True)
    original = message_to_normalized(message("hi", st=st, channel_id=THREAD), TENANT, bot_id=BOT,
                                     via="mention", bot_name="support")
    assert SessionKey.of(in_thread) == SessionKey.of(original)
    assert in_thread.conversation.thread_id == THREAD


def test_only_the_user_the_answer_was_for_may_choose() -> None:
    custom = custom_id(ALICE["id"], 1, APPROVE.value)
    carol = parse_click(click_payload(custom, user=CAROL))
    assert carol is not None and not carol.allowed()
    anyone = parse_click(click_payload(custom_id(None, 1, "v"), user=CAROL))
    assert anyone is not None and anyone.allowed()


@pytest.mark.parametrize("change", [
    {"type": 2},  # a slash command
    {"data": {"custom_id": "someone-elses", "component_type": 2}},
    {"data": {"custom_id": "cg1:1:1:v", "component_type": 3}},  # a select menu
    {"id": "not-a-snowflake"},
    {"member": None, "user": None},
])
def test_other_interactions_are_not_clicks(change: dict[str, Any]) -> None:
    payload = click_payload(custom_id(ALICE["id"], 1, "v"))
    payload.update(change)
    assert parse_click(payload) is None


def test_click_of_reads_an_interaction_parsed_by_discord_py() -> None:
    st = state(with_guild=True)
    st._get_client = lambda: SimpleNamespace(user=st.user)  # type: ignore[attr-defined]
    st.http = SimpleNamespace(_HTTPClient__session=None)  # type: ignore[assignment]
    custom = custom_id(ALICE["id"], 1, APPROVE.value)
    payload = click_payload(custom, channel={
        "id": THREAD, "type": 11, "parent_id": CHANNEL, "name": "a thread", "guild_id": GUILD,
        "owner_id": ALICE["id"], "message_count": 0, "member_count": 1,
        "rate_limit_per_user": 0,
        "thread_metadata": {"archived": False, "auto_archive_duration": 60,
                            "archive_timestamp": "2026-01-01T00:00:00+00:00", "locked": False}})
    interaction: discord.Interaction[Any] = discord.Interaction(data=payload, state=st)  # type: ignore[arg-type]
    click, expected = click_of(interaction), parse_click(payload)
    assert click is not None and expected is not None
    assert replace(click, rows=()) == replace(expected, rows=())
    assert click.rows[0]["components"][0]["custom_id"] == custom and click.parent_id == CHANNEL and click.label == "Approve"
    assert click.user_name == "alice"
