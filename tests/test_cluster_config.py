"""The `cluster` section: validation with path-precise problems, and a change needs a restart."""

from __future__ import annotations

import pytest

from chatgateway.config import parse_config
from chatgateway.daemon import restart_needed
from chatgateway.errors import ConfigError

PG = {"backend": "postgres", "dsn": {"value": "postgresql://gw@db/gw"}}


def problems(data: dict) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, file="gw.yaml", environ={})
    return [(p.path, p.message) for p in caught.value.problems]


def test_local_is_the_default_and_postgres_needs_the_postgres_store():
    assert parse_config({}, file="gw.yaml", environ={}).cluster.coordination == "local"
    config = parse_config({"storage": PG, "cluster": {"coordination": "postgres"}},
                          file="gw.yaml", environ={})
    assert (config.cluster.coordination, config.cluster.claim_timeout) == ("postgres", 120.0)
    assert problems({"cluster": {"coordination": "postgres"}}) == [
        ("cluster.coordination",
         "postgres needs storage.backend: postgres (the instances share its database)")
    ]


def test_bad_values_name_their_key():
    found = problems({"storage": PG, "cluster": {"coordination": "redis", "claim_timeout": 0,
                                                  "extra": 1}})
    assert {path for path, _ in found} == {
        "cluster.coordination", "cluster.claim_timeout", "cluster.extra"}


def test_changing_cluster_needs_a_restart():
    old = parse_config({"storage": PG}, file="gw.yaml", environ={})
    new = parse_config({"storage": PG, "cluster": {"coordination": "postgres"}},
                       file="gw.yaml", environ={})
    assert restart_needed(old, new) == ["cluster"]
