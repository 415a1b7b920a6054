"""An A2A agent's file parts and buttons reach Slack as files in the thread and Block Kit
buttons, like the chatgateway protocol's `attachments` and `actions`: the real slack-bolt in the
gateway, the fake Slack, and an A2A server made of a2a-sdk's own classes."""

from __future__ import annotations

from typing import Any

from tests.fakes.slack import FakeSlack
from tests.fakes.slack_files import SlackRich
from tests.test_invoker_a2a import PNG, TOKEN, make_a2a  # noqa: F401  (fixture)
from tests.test_slack_e2e import slack_tenant, start
from tests.test_slack_rich import action_blocks, fake_slack, rich  # noqa: F401  (fixtures)


async def test_an_a2a_answers_files_and_buttons_show_in_slack(
    fake_slack: FakeSlack, rich: SlackRich, make_a2a: Any, make_gateway: Any  # noqa: F811
) -> None:
    server = await make_a2a()
    app = fake_slack.add_app()
    agent = {"protocol": "a2a", "bearer_token": {"value": TOKEN}, "timeout": 10}
    await start(make_gateway, fake_slack,
                slack_tenant("acme", server.base_url, fake_slack, app, agent=agent))
    delivery = await fake_slack.mention(app, "U0ALICE", "chart please", channel="C0GENERAL")
    root = delivery.envelope["payload"]["event"]["ts"]

    # The bytes part is uploaded into the thread (the URL part's host does not resolve: it is
    # listed as text instead, as for any agent's file that cannot be fetched).
    shared = await rich.wait_shared(1)
    assert (shared[0].title, shared[0].data) == ("chart.png", PNG)
    assert (shared[0].channel, shared[0].thread_ts) == ("C0GENERAL", root)
    answer = await rich.wait_message(lambda m: action_blocks(m))
    assert answer.thread_ts == root
    buttons = action_blocks(answer)[0]
    assert [(b["text"]["text"], b["value"]) for b in buttons["elements"]] == [
        ("Approve", "approve-7"), ("Reject", "reject-7")]
    assert "Here is the chart." in answer.blocks[0]["text"]["text"]
