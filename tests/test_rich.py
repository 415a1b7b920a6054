"""Files and buttons of agents' answers: validation, stored form, text fallback, typed choice."""

from __future__ import annotations

import base64

from chatgateway import rich
from chatgateway.models import (
    Action,
    Conversation,
    ConversationKind,
    NormalizedMessage,
    OutFile,
    Platform,
    Role,
    SessionKey,
    TenantId,
    Turn,
    User,
)
from chatgateway.store.base import SessionStore
from tests.test_store import postgres_schema, reopen, store  # noqa: F401 - the backends' fixture

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 16).decode()


def test_parse_keeps_valid_items_and_drops_bad_ones() -> None:
    files, actions = rich.parse_parts(
        {
            "attachments": [
                {"name": "chart.png", "contentType": "image/png", "data": PNG},
                {"name": "report.pdf", "url": "https://files.example/r.pdf"},
                {"name": "x", "url": "file:///etc/passwd"},  # not http(s)
                {"name": "y", "data": "not base64!"},
                {"name": "z", "url": "https://a", "data": PNG},  # both
                {"contentType": "text/plain", "url": "https://a"},  # no name
                "a string",
            ],
            "actions": [
                {"label": "Approve", "value": "approve", "style": "primary"},
                {"label": "Reject", "value": "reject", "style": "sparkly"},
                {"label": "approve", "value": "again"},  # repeats a label
                {"label": "", "value": "v"},
                {"label": "L" * (rich.MAX_LABEL + 1), "value": "v"},
                {"label": "no value"},
            ],
        }
    )
    assert [f.name for f in files] == ["chart.png", "report.pdf"]
    assert files[0].data is not None and files[0].data.startswith(b"\x89PNG")
    assert files[1].content_type == "application/pdf"  # guessed from the name
    assert actions == (
        Action("Approve", "approve", "primary"),
        Action("Reject", "reject", None),  # an unknown style is dropped, not the button
    )


def test_parse_limits() -> None:
    many = [{"label": f"b{i}", "value": str(i)} for i in range(8)]
    files = [{"name": f"f{i}", "url": f"https://x/{i}"} for i in range(12)]
    got_files, got_actions = rich.parse_parts({"attachments": files, "actions": many})
    assert len(got_files) == rich.MAX_FILES and len(got_actions) == rich.MAX_ACTIONS
    big = base64.b64encode(b"x" * (rich.MAX_DATA_BYTES + 1)).decode()
    assert rich.parse_parts({"attachments": [{"name": "big", "data": big}]}) == ((), ())
    assert rich.parse_parts({"attachments": "nope", "actions": {"a": 1}}) == ((), ())
    assert rich.parse_parts({}) == ((), ())


def test_stored_form_round_trips() -> None:
    turn = Turn(
        Role.AGENT,
        "Here it is",
        1.5,
        (
            OutFile("a.png", "image/png", data=b"\x89PNG"),
            OutFile("b.pdf", "application/pdf", url="https://x/b"),
        ),
        (Action("Yes", "yes", "primary"), Action("No", "no")),
    )
    text = rich.stored_text(turn)
    assert text.startswith("Here it is" + rich.MARK)
    assert rich.stored_turn("agent", text, 1.5) == turn
    plain = Turn(Role.AGENT, "just text", 2.0)
    assert rich.stored_text(plain) == "just text"
    assert rich.stored_turn("agent", "just text", 2.0) == plain
    # A user's text is never read as parts, and a tail that is not ours stays text.
    assert rich.stored_turn("user", text, 1.0).text == text
    assert rich.stored_turn("agent", "a\x1eb", 1.0).text == "a\x1eb"


def test_fallback_text() -> None:
    files = (
        OutFile("r.pdf", "application/pdf", url="https://x/r.pdf"),
        OutFile("c.png", "image/png", data=b"1"),
    )
    actions = (Action("Approve", "approve"), Action("Reject", "reject"))
    assert rich.fallback_text("Done?", (), actions) == "Done?\n\nReply 1 for Approve, 2 for Reject."
    assert rich.fallback_text("", files, ()) == "- [r.pdf](https://x/r.pdf)\n- c.png"
    linked = rich.fallback_text("x", files, (), link=lambda i, f: f"https://gw/{i}")
    assert linked == "x\n\n- [r.pdf](https://x/r.pdf)\n- [c.png](https://gw/1)"
    assert rich.fallback_text("only text") == "only text"


def _message(text: str) -> NormalizedMessage:
    return NormalizedMessage(
        tenant_id=TenantId("t"),
        platform=Platform.SLACK,
        conversation=Conversation("C1", ConversationKind.CHANNEL),
        user=User("U1"),
        text=text,
        message_id="m1",
        timestamp=1.0,
        metadata={"x": 1},
    )


def test_typed_choice() -> None:
    offer = Turn(
        Role.AGENT, "Ok?", 1.0, (), (Action("Approve", "approve-42"), Action("Reject", "reject-42"))
    )
    history = [Turn(Role.USER, "deploy", 0.5), offer]
    assert rich.typed_choice("1", history) == (1, offer.actions[0])
    assert rich.typed_choice(" 2 ", history) == (2, offer.actions[1])
    assert rich.typed_choice("reject", history) == (2, offer.actions[1])
    assert rich.typed_choice("3", history) is None
    assert rich.typed_choice("0", history) is None
    assert rich.typed_choice("approve please", history) is None
    # Only right after the offer: once the user said something else, "1" is just "1".
    assert rich.typed_choice("1", [*history, Turn(Role.USER, "hm", 2.0)]) is None
    assert rich.typed_choice("1", [Turn(Role.AGENT, "no buttons", 1.0)]) is None
    assert rich.typed_choice("1", []) is None
    message = rich.chosen(_message("1"), 1, offer.actions[0])
    assert message.text == "approve-42"
    assert message.metadata == {
        "x": 1,
        "action": {
            "value": "approve-42",
            "label": "Approve",
            "index": 1,
            "via": "typed",
            "typed": "1",
        },
    }


async def test_an_answers_files_and_buttons_survive_a_reopen(store: SessionStore) -> None:  # noqa: F811
    """Both backends keep an agent turn's files and buttons with the transcript (the stored
    text carries them after a separator); history, export and a reopened store read them."""
    k = SessionKey(TenantId("tenant-a"), Platform.WEB, "u1", "", "u1")
    session = await store.create_session(k, kind=ConversationKind.WEB, user_name=None, now=1.0)
    answer = Turn(
        Role.AGENT,
        "Here",
        2.0,
        (
            OutFile("c.png", "image/png", data=b"\x89PNG\x00\x01"),
            OutFile("r.pdf", "application/pdf", url="https://x/r"),
        ),
        (Action("Approve", "approve", "primary"), Action("Reject", "reject")),
    )
    turns = [Turn(Role.USER, "go", 1.5), answer]
    await store.record_exchange(k.tenant_id, session.id, turns, max_turns=50)
    assert (await store.history(k.tenant_id, session.id, 10)) == turns
    fresh = await reopen(store)
    try:
        assert (await fresh.history(k.tenant_id, session.id, 10)) == turns
        exported = await fresh.export_user(k.tenant_id, "u1")
        assert exported[0].turns == turns
    finally:
        await fresh.close()
