"""Pure Slack conversions: payloads -> NormalizedMessage, mention stripping, mrkdwn, splitting."""

from __future__ import annotations

import random
import re
from typing import Any

import pytest

from adapters.slack.convert import (
    MAX_MESSAGE_CHARS,
    BotIdentity,
    Ignored,
    Inbound,
    command_to_inbound,
    event_to_inbound,
    markdown_to_mrkdwn,
    slack_to_text,
    split_message,
    strip_mention,
)
from chatgateway.models import ConversationKind, Platform, TenantId

BOT = BotIdentity(user_id="UBOT", bot_id="BBOT", team_id="T1")
TENANT = TenantId("acme")


def body(event: dict[str, Any], event_id: str = "Ev1") -> dict[str, Any]:
    return {"type": "event_callback", "team_id": "T1", "event_id": event_id, "event": event}


def dm(**extra: Any) -> dict[str, Any]:
    return body({"type": "message", "channel_type": "im", "channel": "D1", "user": "U1",
                 "text": "hello", "ts": "100.000001", **extra})


def mention(**extra: Any) -> dict[str, Any]:
    return body({"type": "app_mention", "channel": "C1", "user": "U1",
                 "text": "<@UBOT> hello", "ts": "200.000001", **extra})


# Mentions and incoming text ----------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("<@UBOT> hi", "hi"),
    ("hi <@UBOT|my-bot>!", "hi !"),
    ("<@UBOT>   what   about <@UBOT> this", "what about this"),
    ("<@UOTHER> hi", "<@UOTHER> hi"),
    ("<@UBOTX> not me", "<@UBOTX> not me"),
])
def test_strip_mention(text, expected):
    assert strip_mention(text, "UBOT") == expected


def test_slack_text_becomes_plain_text():
    text = ("<@UBOT> ask <@U2|bob> in <#C1|general> about <https://a.com/x?y=1&amp;z=2|docs>, "
            "<https://b.com>, <mailto:x@y.z|x@y.z>, <!here> &lt;tag&gt; &amp; more")
    assert slack_to_text(text, "UBOT") == (
        "ask @bob in #general about [docs](https://a.com/x?y=1&z=2), https://b.com, x@y.z, "
        "@here <tag> & more")


# Events -> messages ------------------------------------------------------------------------


def test_dm_becomes_a_dm_message():
    result = event_to_inbound(TENANT, dm(user_profile={"display_name": "Alice"}), BOT)
    assert isinstance(result, Inbound)
    msg = result.message
    assert (msg.tenant_id, msg.platform, msg.message_id) == (TENANT, Platform.SLACK, "Ev1")
    assert msg.conversation.id == "D1" and msg.conversation.kind == ConversationKind.DM
    assert msg.conversation.thread_id is None  # one session per DM, whatever the thread
    assert (msg.user.id, msg.user.display_name, msg.text) == ("U1", "Alice", "hello")
    assert msg.timestamp == 100.000001
    assert result.target.channel == "D1" and result.target.thread_ts is None
    assert result.target.message_ts == "100.000001"


def test_dm_in_a_thread_is_answered_in_that_thread_but_keeps_the_session():
    result = event_to_inbound(TENANT, dm(thread_ts="50.000001"), BOT)
    assert isinstance(result, Inbound)
    assert result.message.conversation.thread_id is None
    assert result.target.thread_ts == "50.000001"


def test_mention_is_threaded_under_itself_or_its_thread_root():
    top = event_to_inbound(TENANT, mention(), BOT)
    assert isinstance(top, Inbound)
    assert top.message.text == "hello"
    assert top.message.conversation.kind == ConversationKind.CHANNEL
    assert top.message.conversation.thread_id == "200.000001"
    assert top.target.thread_ts == "200.000001"
    reply = event_to_inbound(TENANT, mention(ts="300.000001", thread_ts="200.000001"), BOT)
    assert isinstance(reply, Inbound)
    assert reply.message.conversation.thread_id == "200.000001"
    assert reply.target.message_ts == "300.000001"


def test_file_share_keeps_attachment_metadata():
    files = [{"name": "a.png", "mimetype": "image/png", "size": 12,
              "url_private": "https://files/a.png"}]
    result = event_to_inbound(TENANT, dm(subtype="file_share", text="", files=files), BOT)
    assert isinstance(result, Inbound)
    (attachment,) = result.message.attachments
    assert (attachment.name, attachment.content_type, attachment.size) == ("a.png", "image/png", 12)


@pytest.mark.parametrize(("payload", "reason"), [
    (dm(user="UBOT"), "own message"),
    (dm(bot_id="BBOT"), "bot message"),
    (dm(bot_id="BOTHER", user="UX"), "bot message"),
    (dm(subtype="bot_message", bot_id="B2"), "subtype bot_message"),
    (dm(subtype="message_changed"), "subtype message_changed"),
    (dm(subtype="message_deleted"), "subtype message_deleted"),
    (dm(subtype="channel_join"), "subtype channel_join"),
    (dm(edited={"user": "U1", "ts": "1.0"}), "edited or hidden"),
    (dm(text="<@UBOT>"), "empty message"),
    (body({"type": "message", "channel_type": "channel", "channel": "C1", "user": "U1",
           "text": "hi", "ts": "1.0"}), "channel message without mention"),
    (mention(channel="D1"), "mention in a DM"),
    (mention(bot_id="BOTHER"), "bot message"),
    (body({"type": "member_joined_channel", "user": "U1", "channel": "C1"}),
     "event member_joined_channel"),
    (body({"type": "reaction_added", "user": "U1"}), "event reaction_added"),
    ({"type": "event_callback", "event": {"type": "message"}}, "no event_id"),
    ({"type": "event_callback", "event_id": "Ev1"}, "no event"),
])
def test_what_never_reaches_the_agent(payload, reason):
    assert event_to_inbound(TENANT, payload, BOT) == Ignored(reason)


# Slash commands ----------------------------------------------------------------------------


def command(**extra: Any) -> dict[str, Any]:
    return {"command": "/ask", "text": "what &amp; why", "user_id": "U1", "user_name": "alice",
            "channel_id": "C1", "trigger_id": "123.456.abc",
            "response_url": "https://hooks.slack.com/commands/1", **extra}


def test_slash_command_becomes_a_message_keyed_by_its_trigger():
    result = command_to_inbound(TENANT, command(), command="/ask")
    assert isinstance(result, Inbound)
    assert result.message.message_id == "command:123.456.abc"
    assert result.message.text == "what & why"
    assert result.message.conversation.kind == ConversationKind.CHANNEL
    assert result.target.response_url == "https://hooks.slack.com/commands/1"
    assert result.target.user_id == "U1"
    again = command_to_inbound(TENANT, command(), command="/ask")
    assert isinstance(again, Inbound) and again.message.message_id == result.message.message_id
    in_dm = command_to_inbound(TENANT, command(channel_id="D9"), command="/ask")
    assert isinstance(in_dm, Inbound) and in_dm.message.conversation.kind == ConversationKind.DM


def test_other_or_empty_commands_are_ignored():
    assert isinstance(command_to_inbound(TENANT, command(), command="/other"), Ignored)
    assert isinstance(command_to_inbound(TENANT, command(), command=None), Ignored)
    assert isinstance(command_to_inbound(TENANT, command(text="  "), command="/ask"), Ignored)


# Markdown -> mrkdwn ------------------------------------------------------------------------


@pytest.mark.parametrize(("markdown", "mrkdwn"), [
    ("**bold** and __bold__", "*bold* and *bold*"),
    ("*italic* and _italic_", "_italic_ and _italic_"),
    ("~~gone~~", "~gone~"),
    ("[the docs](https://x.io/a?b=1&c=2)", "<https://x.io/a?b=1&amp;c=2|the docs>"),
    ("see <https://x.io> or https://y.io/p.", "see <https://x.io> or <https://y.io/p>."),
    ("# Title\n## Sub **x**", "*Title*\n*Sub x*"),
    ("- one\n* two\n  + three", "• one\n• two\n  • three"),
    ("1 < 2 && 3 > 2", "1 &lt; 2 &amp;&amp; 3 &gt; 2"),
    ("`a*b*c <x>`", "`a*b*c &lt;x&gt;`"),
    ("```python\nif a < b:\n    **not bold**\n```", "```\nif a &lt; b:\n    **not bold**\n```"),
    ("snake_case_name and 2*3*4", "snake_case_name and 2*3*4"),
])
def test_markdown_to_mrkdwn(markdown, mrkdwn):
    assert markdown_to_mrkdwn(markdown) == mrkdwn


# Splitting ---------------------------------------------------------------------------------


def fences_balanced(part: str) -> bool:
    return part.count("```") % 2 == 0


def words(text: str) -> list[str]:
    return [w for w in re.split(r"\s+", text.replace("```", " ")) if w]


def content(text: str) -> str:
    """Everything but whitespace and fences (what a split must keep, in order)."""
    return re.sub(r"\s+", "", text.replace("```", ""))


def test_short_text_is_one_message_and_empty_is_none():
    assert split_message("hello") == ["hello"]
    assert split_message("  \n ") == []


def test_9000_characters_with_a_code_block_split_outside_the_block():
    code = "```\n" + "\n".join(f"row {i:03d} = {'v' * 40}" for i in range(50)) + "\n```"
    text = ("Intro sentence number one. " * 150 + "\n\n" + code + "\n\n"
            + "Closing words of the answer. " * 150)
    assert len(text) > 9000
    parts = split_message(text)
    assert len(parts) >= 3
    assert all(len(p) <= MAX_MESSAGE_CHARS for p in parts)
    assert all(fences_balanced(p) for p in parts)
    assert [p for p in parts if code in p]  # the block fits in a message: never cut
    assert words("\n".join(parts)) == words(text)


def test_a_code_block_longer_than_a_message_is_closed_and_reopened():
    lines = [f"line {i:04d} " + "x" * 60 for i in range(200)]
    text = "Before.\n```sql\n" + "\n".join(lines) + "\n```\nAfter."
    parts = split_message(markdown_to_mrkdwn(text))
    assert len(parts) >= 4
    assert all(len(p) <= MAX_MESSAGE_CHARS and fences_balanced(p) for p in parts)
    kept = [line for p in parts for line in p.split("\n") if line.startswith("line ")]
    assert kept == lines
    assert parts[0].startswith("Before.") and parts[-1].endswith("After.")


def test_an_unterminated_code_block_is_closed():
    parts = split_message("```\n" + "\n".join("y" * 70 for _ in range(120)))
    assert all(p.startswith("```") and p.endswith("```") for p in parts)


def test_one_huge_word_is_cut_without_breaking_an_entity():
    text = "&amp;" * 2000  # 10,000 characters, no spaces
    parts = split_message(text)
    assert all(len(p) <= MAX_MESSAGE_CHARS for p in parts)
    assert all(re.fullmatch(r"(&amp;)+", p) for p in parts)
    assert "".join(parts) == text


def test_random_mixtures_keep_every_invariant():
    rng = random.Random(1234)
    for _ in range(60):
        chunks = []
        for _ in range(rng.randint(1, 30)):
            kind = rng.random()
            if kind < 0.25:
                body = "\n".join("c" * rng.randint(0, 120) for _ in range(rng.randint(1, 80)))
                chunks.append(f"```\n{body}\n```")
            elif kind < 0.35:
                chunks.append("w" * rng.randint(1, 9000))
            else:
                chunks.append(" ".join("word" * rng.randint(1, 3)
                                       for _ in range(rng.randint(1, 600))))
        text = rng.choice(["\n\n", "\n"]).join(chunks)
        limit = rng.choice([500, 2000, MAX_MESSAGE_CHARS])
        parts = split_message(text, limit=limit)
        assert max(len(p) for p in parts) <= limit
        assert all(fences_balanced(p) for p in parts), text[:200]
        assert content("".join(parts)) == content(text)
