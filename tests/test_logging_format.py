"""configure_logging: JSON off a terminal, console on one, journald priorities, the scrubber."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from chatgateway.logging import configure_logging, scrubber, secrets_in

log = structlog.get_logger("chatgateway.test")
SECRET = "sk-live-0123456789abcdef"
LONGER = SECRET + "-and-more"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore() -> Iterator[None]:
    saved = scrubber._secrets
    yield
    scrubber.update(saved)
    configure_logging()
    structlog.contextvars.clear_contextvars()


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_off_a_terminal_with_level_logger_and_timestamp():
    stream = io.StringIO()
    configure_logging("info", "auto", stream)
    log.info("thing_happened", count=3)
    log.debug("too_detailed")
    (line,) = lines(stream)
    assert line["event"] == "thing_happened" and line["count"] == 3
    assert line["level"] == "info" and line["logger"] == "chatgateway.test"
    assert line["timestamp"].endswith("Z")


def test_console_lines_on_a_terminal():
    stream = Terminal()
    configure_logging("info", "auto", stream)
    log.info("thing_happened", count=3)
    text = re.sub(r"\x1b\[[0-9;]*m", "", stream.getvalue())  # colours on a terminal
    assert "[info     ] thing_happened" in text and "count=3" in text
    with pytest.raises(ValueError):
        json.loads(text)


def test_journald_stream_gets_syslog_priority_prefixes(tmp_path: Path):
    with (tmp_path / "journal").open("w+") as stream:
        st = os.fstat(stream.fileno())
        configure_logging("info", "json", stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        log.info("fine")
        log.warning("hmm")
        log.error("bad")
        logging.getLogger("aiohttp.server").error("library trouble")
        stream.flush()
        stream.seek(0)
        got = stream.read().splitlines()
    assert [line[:3] for line in got] == ["<6>", "<4>", "<3>", "<3>"]
    assert json.loads(got[0][3:])["event"] == "fine"
    # Not the journal (another file): no prefixes.
    other = io.StringIO()
    configure_logging("info", "json", other, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    log.info("plain")
    assert other.getvalue().startswith("{")


@pytest.mark.parametrize("decoys", [0, 2000], ids=["few secrets", "many tenants' secrets"])
def test_scrubber_masks_secrets_everywhere_a_log_line_can_carry_them(decoys):
    stream = io.StringIO()
    configure_logging("debug", "json", stream)
    scrubber.update([SECRET, LONGER, "short", *(f"decoy-{i:05d}-secret" for i in range(decoys))])
    structlog.contextvars.bind_contextvars(request_token=SECRET)
    log.info(f"event with {SECRET}", detail=f"Bearer {SECRET}", nested={"headers": [LONGER]})
    try:
        raise RuntimeError(f"upstream rejected {SECRET}")
    except RuntimeError:
        log.exception("call_failed")
    logging.getLogger("aiohttp.client").warning("retrying with token %s", SECRET)
    logging.getLogger("slack_sdk").error("auth failed for %s", LONGER, exc_info=False)
    log.info("tiny", value="short")
    text = stream.getvalue()
    assert SECRET not in text and "-and-more" not in text
    first, failed, foreign, foreign2, tiny = lines(stream)
    assert first["event"] == "event with [redacted]"
    assert first["detail"] == "Bearer [redacted]"
    assert first["request_token"] == "[redacted]"
    assert "[redacted]" in first["nested"]
    assert "RuntimeError: upstream rejected [redacted]" in failed["exception"]
    assert foreign["event"] == "retrying with token [redacted]"
    assert foreign2["event"] == "auth failed for [redacted]", "the longer secret is masked whole"
    assert tiny["value"] == "short", "values under 6 characters are never treated as secrets"


def test_scrubber_with_many_secrets_masks_each_longest_first():
    many = [f"tenant-{i:04d}-key-{'x' * 20}" for i in range(3000)]
    scrubber.update([*many, "tenant-0042-key", "sk-live-0123456789abcdef"])
    text = f"a {many[42]} b {many[2999]} c tenant-0042-key d sk-live-0123456789abcdef e"
    assert scrubber.scrub(text) == "a [redacted] b [redacted] c [redacted] d [redacted] e"
    assert scrubber.scrub("nothing secret here, tenant-0042-ke") == "nothing secret here, tenant-0042-ke"


def test_scrubber_add_keeps_earlier_secrets():
    scrubber.update(["first-secret-value"])
    scrubber.add(["second-secret-value"])
    assert scrubber.scrub("first-secret-value second-secret-value") == "[redacted] [redacted]"


def test_secrets_in_finds_every_secret_of_a_config():
    from chatgateway.config import parse_config

    config = parse_config(
        {
            "admin": {"token": {"value": "admin-token-value"}},
            "tenants": [
                {
                    "id": "acme",
                    "agent": {"url": "http://a.example", "secret": {"env": "AGENT_SECRET"}},
                    "web": {"api_keys": [{"value": "key-one-value"}]},
                    "discord": {"bots": [{"token": {"value": "discord-token-value"}}]},
                }
            ],
        },
        file="test.yaml",
        environ={"AGENT_SECRET": "agent-secret-from-env"},
    )
    assert sorted(secrets_in(config)) == [
        "admin-token-value",
        "agent-secret-from-env",
        "discord-token-value",
        "key-one-value",
    ]


class Writes(io.StringIO):
    """A stream that remembers each write: one write per loop iteration is the point."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


async def test_lines_of_one_loop_iteration_are_one_write_and_warnings_go_at_once() -> None:
    stream = Writes()
    configure_logging("info", "json", stream=stream)
    log.info("first", n=1)
    log.info("second", n=2)
    logging.getLogger("somelibrary").info("library line")
    assert stream.writes == []  # not yet: the iteration is still running
    await asyncio.sleep(0)
    assert len(stream.writes) == 1
    assert [e["event"] for e in lines(stream)] == ["first", "second", "library line"]
    log.info("third")
    log.warning("trouble")  # written at once, after what was pending, in order
    assert len(stream.writes) == 2
    assert [e["event"] for e in lines(stream)][-2:] == ["third", "trouble"]


def test_lines_logged_off_the_event_loop_are_written_at_once() -> None:
    stream = Writes()
    configure_logging("info", "json", stream=stream)
    log.info("before the loop starts")
    assert [e["event"] for e in lines(stream)] == ["before the loop starts"]
