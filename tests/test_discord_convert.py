"""The Discord adapter's pure functions, on messages parsed by discord.py itself."""

from __future__ import annotations

from typing import Any

import discord
import pytest
from discord.state import ConnectionState

from adapters.discord.convert import (
    MAX_MESSAGE_LENGTH,
    reply_nonce,
    route,
    split_message,
    strip_mentions,
    to_normalized,
)
from chatgateway.models import ConversationKind, Platform, TenantId
from tests.fakes.discord import user_object

BOT = 711111111111111111
ALICE = user_object("722222222222222222", "alice")
CAROL = user_object("733333333333333333", "carol")
GUILD, CHANNEL, THREAD, BOT_ROLE = (
    "744444444444444444", "755555555555555555", "766666666666666666", "777777777777777777"
)


def state(*, with_guild: bool = False) -> ConnectionState[Any]:
    st: ConnectionState[Any] = ConnectionState(
        dispatch=lambda *a: None, handlers={}, hooks={}, http=None,  # type: ignore[arg-type]
        intents=discord.Intents.none(),
    )
    st.user = discord.ClientUser(state=st, data=user_object(str(BOT), "bot", bot=True))
    if with_guild:
        role = {"permissions": "0", "position": 0, "color": 0, "hoist": False,
                "mentionable": True}
        st._add_guild_from_data({
            "id": GUILD, "name": "guild", "member_count": 1, "members": [],
            "channels": [{"id": CHANNEL, "type": 0, "name": "general", "position": 0}],
            "threads": [{
                "id": THREAD, "type": 11, "parent_id": CHANNEL, "name": "a thread",
                "owner_id": ALICE["id"], "message_count": 0, "member_count": 1,
                "rate_limit_per_user": 0,
                "thread_metadata": {"archived": False, "auto_archive_duration": 60,
                                    "archive_timestamp": "2026-01-01T00:00:00+00:00",
                                    "locked": False},
            }],
            "roles": [
                {"id": GUILD, "name": "@everyone", "managed": False, **role},
                {"id": BOT_ROLE, "name": "bot", "managed": True, "tags": {"bot_id": str(BOT)},
                 **role},
            ],
        })
    return st


def message(content: str, *, st: ConnectionState[Any] | None = None, guild: bool = True,
            channel_id: str = CHANNEL, author: dict[str, Any] | None = None,
            **extra: Any) -> discord.Message:
    st = st or state()
    data: dict[str, Any] = {
        "id": "788888888888888888", "channel_id": channel_id, "author": author or ALICE,
        "content": content, "timestamp": "2026-01-01T00:00:00+00:00",
        "edited_timestamp": None, "tts": False, "mention_everyone": False, "mentions": [],
        "mention_roles": [], "attachments": [], "embeds": [], "pinned": False, "type": 0,
        **extra,
    }
    if guild:
        data["guild_id"] = GUILD
    channel, _ = st._get_guild_channel(data)  # type: ignore[arg-type]
    return discord.Message(state=st, channel=channel, data=data)  # type: ignore[arg-type]


BOT_USER = user_object(str(BOT), "bot", bot=True)


def test_route_answers_dms_mentions_replies_and_configured_channels() -> None:
    assert route(message("hi", guild=False), BOT, []) == "dm"
    assert route(message(f"<@{BOT}> hi", mentions=[BOT_USER]), BOT, []) == "mention"
    replied = {"message_reference": {"message_id": "1", "channel_id": CHANNEL},
               "referenced_message": {
                   "id": "799999999999999999", "channel_id": CHANNEL, "author": BOT_USER,
                   "content": "earlier answer", "timestamp": "2026-01-01T00:00:00+00:00",
                   "edited_timestamp": None, "tts": False, "mention_everyone": False,
                   "mentions": [], "mention_roles": [], "attachments": [], "embeds": [],
                   "pinned": False, "type": 0}}
    assert route(message("and then?", type=19, **replied), BOT, []) == "reply"
    assert route(message("chat"), BOT, [CHANNEL]) == "channel"
    assert route(message("chat"), BOT, []) is None
    assert route(message("chat", mentions=[CAROL]), BOT, []) is None


def test_route_ignores_own_bots_webhooks_and_system_messages() -> None:
    assert route(message("echo", guild=False, author=BOT_USER), BOT, []) is None
    other = user_object("700000000000000001", "other", bot=True)
    assert route(message("beep", guild=False, author=other), BOT, []) is None
    assert route(message("hook", guild=False, webhook_id="700000000000000002"), BOT, []) is None
    assert route(message("", guild=False, type=7), BOT, []) is None  # member joined


def test_thread_and_bot_role_mention_with_the_guild_cached() -> None:
    st = state(with_guild=True)
    msg = message(f"<@&{BOT_ROLE}> in a thread", st=st, channel_id=THREAD,
                  mention_roles=[BOT_ROLE])
    guild = msg.guild
    assert guild is not None and guild.self_role is not None
    roles = (guild.self_role.id,)
    assert route(msg, BOT, [], roles) == "mention"
    assert route(message("plain", st=st, channel_id=THREAD), BOT, [CHANNEL]) == "channel"
    normalized = to_normalized(msg, TenantId("t"), bot_id=BOT, via="mention", bot_name="b",
                               bot_role_ids=roles)
    assert normalized.text == "in a thread"
    assert normalized.conversation.id == CHANNEL
    assert normalized.conversation.thread_id == THREAD
    assert normalized.metadata["channelId"] == THREAD


def test_to_normalized() -> None:
    attachment = {"id": "1", "filename": "notes.txt", "size": 12, "url": "https://cdn/x",
                  "proxy_url": "https://cdn/x", "content_type": "text/plain"}
    msg = message(f"<@{BOT}> ask <@{CAROL['id']}> about it", mentions=[BOT_USER, CAROL],
                  attachments=[attachment])
    normalized = to_normalized(msg, TenantId("acme"), bot_id=BOT, via="mention", bot_name="b")
    assert normalized.platform == Platform.DISCORD
    assert normalized.text == "ask @carol about it"
    assert normalized.message_id == "788888888888888888"
    assert normalized.user.id == ALICE["id"] and normalized.user.display_name == "alice"
    assert normalized.conversation.kind == ConversationKind.CHANNEL
    assert normalized.conversation.id == CHANNEL and normalized.conversation.thread_id is None
    assert normalized.metadata == {"bot": "b", "via": "mention", "channelId": CHANNEL,
                                   "guildId": GUILD}
    assert normalized.attachments[0].name == "notes.txt"
    assert normalized.attachments[0].size == 12
    dm = to_normalized(message("hi", guild=False), TenantId("acme"), bot_id=BOT, via="dm",
                       bot_name="b")
    assert dm.conversation.kind == ConversationKind.DM and "guildId" not in dm.metadata


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (f"<@{BOT}> hello", "hello"),
        (f"<@!{BOT}> hello", "hello"),
        (f"hello <@{BOT}>", "hello"),
        (f"hey <@{BOT}> how are you", "hey how are you"),
        (f"<@{BOT}>", ""),
        (f"<@&{BOT_ROLE}> hi", "hi"),
        ("<@700000000000000009> is unknown", "<@700000000000000009> is unknown"),
    ],
)
def test_strip_mentions(content: str, expected: str) -> None:
    assert strip_mentions(content, BOT, bot_role_ids=[int(BOT_ROLE)]) == expected


def test_reply_nonce_is_stable_short_and_distinct() -> None:
    first = reply_nonce(BOT, 123, 0)
    assert first == reply_nonce(BOT, "123", 0)
    assert len(first) <= 25
    assert len({first, reply_nonce(BOT, 123, 1), reply_nonce(BOT, 124, 0),
                reply_nonce(BOT + 1, 123, 0)}) == 4


def fences_balanced(parts: list[str]) -> bool:
    return all(part.count("```") % 2 == 0 for part in parts)


def test_short_text_is_one_message() -> None:
    assert split_message("hello") == ["hello"]
    assert split_message("x" * MAX_MESSAGE_LENGTH) == ["x" * MAX_MESSAGE_LENGTH]
    assert split_message("") == []


def test_split_keeps_a_code_block_whole() -> None:
    prose = "".join(f"Paragraph line {i}, some words to fill it.\n" for i in range(30))
    code = "```js\n" + "".join(f"console.log({i});\n" for i in range(80)) + "```\n"
    text = prose + code + prose
    parts = split_message(text)
    assert all(len(p) <= MAX_MESSAGE_LENGTH for p in parts)
    assert fences_balanced(parts)
    assert any(code.strip() == p.strip() or code.strip() in p for p in parts)
    assert "".join(parts).replace("\n", "") == text.replace("\n", "")


def test_split_reopens_a_code_block_longer_than_a_message() -> None:
    code = "```python\n" + "".join(f"x_{i} = {i} * 2  # compute\n" for i in range(200)) + "```"
    text = "Here it is:\n" + code + "\nDone."
    parts = split_message(text)
    assert len(parts) >= 3
    assert all(len(p) <= MAX_MESSAGE_LENGTH for p in parts)
    assert fences_balanced(parts)
    code_parts = [p for p in parts if "```" in p]
    assert all(p.lstrip().startswith(("```python", "Here it is:")) for p in code_parts)
    body = "".join(p.replace("```python\n", "").replace("```", "") for p in parts)
    for i in range(200):
        assert f"x_{i} = {i} * 2  # compute\n" in body


def test_split_long_lines_and_words() -> None:
    words = " ".join(["word"] * 1000)  # one 4,999-character line
    parts = split_message(words)
    assert all(len(p) <= MAX_MESSAGE_LENGTH for p in parts)
    assert "".join(parts).replace(" ", "") == words.replace(" ", "")
    blob = "y" * 4500
    assert "".join(split_message(blob)) == blob
    code = "```\n" + "z" * 5000 + "\n```"
    parts = split_message(code)
    assert all(len(p) <= MAX_MESSAGE_LENGTH for p in parts) and fences_balanced(parts)


def test_split_closes_an_unterminated_code_block() -> None:
    text = "intro\n" * 300 + "```sh\n" + "echo hi\n" * 300
    parts = split_message(text)
    assert all(len(p) <= MAX_MESSAGE_LENGTH for p in parts)
    assert fences_balanced(parts)
