"""`cluster.address` as Ray users type it, and the hint when a cluster's token auth refuses us."""

from __future__ import annotations

import pytest

from orchestrator.cluster.connect import auth_hint
from orchestrator.config.compose import compose
from orchestrator.config.validate import validate


@pytest.mark.parametrize("address", ["127.0.0.1:6379", "head-node:6379", "ray://10.0.0.2:10001",
                                     "auto", "local"])
def test_ray_addresses_are_accepted_as_ray_takes_them(address):
    assert validate(compose([f"cluster.address={address}"])).cluster.address == address


def test_an_auth_refusal_says_how_to_join():
    refused = ConnectionError("Failed to connect to GCS: InvalidAuthToken: the token is missing")
    assert "RAY_AUTH_MODE=token" in auth_hint(refused)
    assert auth_hint(ConnectionError("GCS did not answer within 30 s")) == ""
