"""Files and buttons in agents' answers: validation, the stored form, the text-only fallback and
the typed choice.

An agent's answer may carry `attachments` (files: a URL the gateway fetches, or base64 bytes) and
`actions` (buttons: a label shown, a value sent back). `parse_parts` validates them item by item:
a bad item is dropped and logged, the answer is still delivered. Where a platform cannot show
them, `fallback_text` turns them into text ("Reply 1 for Approve, 2 for Reject", files as links),
and `typed_choice` maps the user's "1" (or "approve") back to the action's value. The wire format
is in docs/agent-protocol.md.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import mimetypes
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Protocol, runtime_checkable

import structlog
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from chatgateway.models import Action, NormalizedMessage, OutFile, Role, Turn

log = structlog.get_logger("chatgateway.rich")

#: Files per answer (Discord takes at most 10 attachments per message).
MAX_FILES = 10
#: Buttons per answer (one Discord action row holds 5; Slack's actions block up to 25).
MAX_ACTIONS = 5
#: A button's label (Slack's button text limit is 75, Discord's 80) and value (Slack's 2,000).
MAX_LABEL = 75
MAX_VALUE = 2000
MAX_NAME = 255
MAX_URL = 2048
#: Bytes of one file given as base64 `data`, and of all of an answer's (they are kept with the
#: transcript); larger files are given by `url`.
MAX_DATA_BYTES = 1024 * 1024
MAX_DATA_TOTAL = 2 * 1024 * 1024
STYLES = frozenset({"primary", "danger"})
_MAX_BASE64 = (MAX_DATA_BYTES + 2) // 3 * 4 + 4

_CONTENT_TYPE = re.compile(r"^[\w.+-]+/[\w.+-]+$")
#: Separates an agent turn's text from its files and buttons in the stored text (RS, never
#: produced by the platforms' text; a turn whose tail does not parse stays plain text).
MARK = "\x1e"
_STORED_VERSION = 1


#: A link to a file of a stored answer, given (tenant, session, the answer's timestamp, the
#: file's index, the file); None when there is none to give.
FileLink = Callable[[str, str, float, int, OutFile], str | None]


class PartError(ValueError):
    """Why one attachment or action of an answer was dropped."""


def _checked(value: str) -> str:
    if "\x00" in value or MARK in value:
        raise ValueError("contains a control character")
    return value


#: Names, labels, URLs: surrounding spaces dropped, not empty, at most so long, no NUL or MARK.
_Name = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_NAME),
    AfterValidator(_checked),
]
_ContentType = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=127)
]
_Url = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_URL),
    AfterValidator(_checked),
]
_Label = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_LABEL),
    AfterValidator(_checked),
]
#: Sent back as it is: spaces are kept.
_Value = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_VALUE), AfterValidator(_checked)
]


class _Item(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)


class FileItem(_Item):
    """One `attachments` item of the agent protocol (docs/agent-protocol.md)."""

    name: _Name
    contentType: _ContentType | None = None
    url: _Url | None = None
    #: Base64 of at most MAX_DATA_BYTES (checked again once decoded).
    data: Annotated[str, StringConstraints(max_length=_MAX_BASE64)] | None = None

    @field_validator("contentType")
    @classmethod
    def _media_type(cls, value: str | None) -> str | None:
        if value is not None and not _CONTENT_TYPE.match(value.lower()):
            raise ValueError("not a media type (type/subtype)")
        return value

    @field_validator("url")
    @classmethod
    def _web_url(cls, value: str | None) -> str | None:
        if value is not None and not value.lower().startswith(("http://", "https://")):
            raise ValueError("must be http or https")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> FileItem:
        if (self.url is None) == (self.data is None):
            raise ValueError("exactly one of url and data is needed")
        return self


class ActionItem(_Item):
    """One `actions` item of the agent protocol."""

    label: _Label
    value: _Value
    # An unknown style is not worth losing the button for: it is shown plain.
    style: Any = None


def _problem(exc: ValidationError) -> str:
    """The first error of a validation, as `field: message` (never the value)."""
    error = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(part) for part in error["loc"])
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def parse_file(item: Any) -> OutFile:
    """One `attachments` item as an OutFile; PartError says why it cannot be one."""
    if not isinstance(item, Mapping):
        raise PartError("not an object")
    try:
        checked = FileItem.model_validate(item)
    except ValidationError as exc:
        raise PartError(_problem(exc)) from None
    name = checked.name.replace("/", "_").replace("\\", "_")
    content_type = (
        checked.contentType or mimetypes.guess_type(name)[0] or "application/octet-stream"
    ).lower()
    if checked.url is not None:
        return OutFile(name, content_type, url=checked.url)
    try:
        raw = base64.b64decode(checked.data or "", validate=True)
    except (binascii.Error, ValueError):
        raise PartError("data: not base64") from None
    if len(raw) > MAX_DATA_BYTES:
        raise PartError(f"data: larger than {MAX_DATA_BYTES} bytes (give a url)")
    return OutFile(name, content_type, data=raw)


def parse_action(item: Any) -> Action:
    """One `actions` item as an Action; PartError says why it cannot be one."""
    if not isinstance(item, Mapping):
        raise PartError("not an object")
    try:
        checked = ActionItem.model_validate(item)
    except ValidationError as exc:
        raise PartError(_problem(exc)) from None
    style = checked.style if checked.style in STYLES else None
    return Action(checked.label, checked.value, style)


def parse_parts(answer: Mapping[str, Any]) -> tuple[tuple[OutFile, ...], tuple[Action, ...]]:
    """The valid `attachments` and `actions` of an agent's answer; bad items are dropped and
    logged (without their content), never failing the answer."""
    files: list[OutFile] = []
    actions: list[Action] = []
    raw_files, raw_actions = answer.get("attachments"), answer.get("actions")
    if raw_files is None and raw_actions is None:
        return (), ()
    total = 0
    for key, raw, limit in (
        ("attachments", raw_files, MAX_FILES),
        ("actions", raw_actions, MAX_ACTIONS),
    ):
        if raw is None:
            continue
        if not isinstance(raw, list):
            log.warning("answer_part_dropped", part=key, reason="not a list")
            continue
        for index, item in enumerate(raw):
            try:
                if index >= limit:
                    raise PartError(f"more than {limit} {key}")
                if key == "attachments":
                    file = parse_file(item)
                    total += len(file.data or b"")
                    if total > MAX_DATA_TOTAL:
                        raise PartError(f"files given as data exceed {MAX_DATA_TOTAL} bytes")
                    files.append(file)
                else:
                    action = parse_action(item)
                    if any(a.label.casefold() == action.label.casefold() for a in actions):
                        raise PartError("label repeats an earlier action's")
                    actions.append(action)
            except PartError as exc:
                log.warning("answer_part_dropped", part=key, index=index, reason=str(exc))
    return tuple(files), tuple(actions)


# The stored form: an agent turn's text, then MARK and a JSON object -------------------------


def file_json(file: OutFile) -> dict[str, Any]:
    """A file as the stored (and agent protocol) JSON: url or base64 data."""
    item: dict[str, Any] = {"name": file.name, "contentType": file.content_type}
    if file.url is not None:
        item["url"] = file.url
    else:
        item["data"] = base64.b64encode(file.data or b"").decode()
    return item


def action_json(action: Action) -> dict[str, Any]:
    item = {"label": action.label, "value": action.value}
    if action.style is not None:
        item["style"] = action.style
    return item


def stored_text(turn: Turn) -> str:
    """The text column of a turn: an agent turn with files or buttons carries them after MARK."""
    if turn.role is not Role.AGENT or not (turn.files or turn.actions):
        return turn.text
    extra = {
        "v": _STORED_VERSION,
        "attachments": [file_json(f) for f in turn.files],
        "actions": [action_json(a) for a in turn.actions],
    }
    return turn.text.replace(MARK, "") + MARK + json.dumps(extra, separators=(",", ":"))


def stored_turn(role: str, text: str, timestamp: float) -> Turn:
    """A turn read from the store (the inverse of `stored_text`)."""
    kind = Role(role)
    if kind is not Role.AGENT or MARK not in text:
        return Turn(kind, text, timestamp)
    head, _, tail = text.rpartition(MARK)
    try:
        extra = json.loads(tail)
        if not isinstance(extra, dict) or extra.get("v") != _STORED_VERSION:
            raise ValueError
        files, actions = parse_parts(extra)
    except ValueError:
        return Turn(kind, text, timestamp)
    return Turn(kind, head, timestamp, files, actions)


# The text-only fallback and the typed choice ---------------------------------------------------


@runtime_checkable
class RichOutbound(Protocol):
    """An Outbound that shows files and buttons itself (else the pipeline sends the text-only
    fallback through `finish`)."""

    async def finish_rich(
        self, text: str, files: tuple[OutFile, ...], actions: tuple[Action, ...]
    ) -> None: ...


def choices_line(actions: Sequence[Action]) -> str:
    """The buttons as choices the user can type: "Reply 1 for Approve, 2 for Reject."."""
    if not actions:
        return ""
    choices = ", ".join(f"{i} for {a.label}" for i, a in enumerate(actions, 1))
    return f"Reply {choices}."


def fallback_text(
    text: str,
    files: Sequence[OutFile] = (),
    actions: Sequence[Action] = (),
    *,
    link: Callable[[int, OutFile], str | None] | None = None,
) -> str:
    """The answer as text only: files as Markdown links (`link(index, file)` gives a link for a
    file the agent gave as bytes, else its name is listed) and the buttons as numbered choices."""
    parts = [text] if text else []
    if files:
        lines = []
        for index, file in enumerate(files):
            href = file.url if file.url is not None else (link(index, file) if link else None)
            label = file.name.replace("[", "(").replace("]", ")")
            lines.append(f"- [{label}]({href})" if href else f"- {label}")
        parts.append("\n".join(lines))
    if actions:
        parts.append(choices_line(actions))
    return "\n\n".join(parts)


def typed_choice(text: str, history: Sequence[Turn]) -> tuple[int, Action] | None:
    """The action a message chooses: the session's latest turn is an answer with buttons and
    the message is exactly one of their numbers ("1") or labels (any case, spaces around
    ignored). Returns (number, action) or None."""
    if not history or history[-1].role is not Role.AGENT or not history[-1].actions:
        return None
    actions = history[-1].actions
    typed = text.strip()
    if typed.isascii() and typed.isdigit():
        number = int(typed)
        return (number, actions[number - 1]) if 1 <= number <= len(actions) else None
    folded = typed.casefold()
    for number, action in enumerate(actions, 1):
        if action.label.casefold() == folded:
            return number, action
    return None


def chosen(message: NormalizedMessage, number: int, action: Action) -> NormalizedMessage:
    """The message as the agent gets it after a typed choice: the action's value as the text,
    and `metadata.action` saying what was chosen and how."""
    metadata = dict(message.metadata)
    metadata["action"] = {
        "value": action.value,
        "label": action.label,
        "index": number,
        "via": "typed",
        "typed": message.text,
    }
    return dataclasses.replace(message, text=action.value, metadata=metadata)
