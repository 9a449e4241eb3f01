"""Joining a cluster: an address whose head does not answer is refused at once, in one line
(``runtime.cluster.session``), not after a minute of Ray's client warnings."""

from __future__ import annotations

import os
import socket

import pytest

import bilevel_ray as br
from bilevel_ray.runtime.cluster import session


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "given, why",
    [
        (lambda: f"127.0.0.1:{_closed_port()}", r"Connection refused"),
        (lambda: "nosuchhost.invalid:6379", r"Name or service not known|not known|resolution"),
        (lambda: "no-port-here", r"'no-port-here' is not host:port"),
        (lambda: "127.0.0.1:99999", r"is not host:port"),
    ],
    ids=["refused", "no-such-host", "no-port", "port-out-of-range"],
)
def test_an_address_that_does_not_answer_is_refused(given, why, monkeypatch):
    address = given()
    with pytest.raises(br.ConfigError, match=rf"^address='{address}': cannot connect .*({why})"):
        session._check_reachable(address)
    monkeypatch.setenv("RAY_ADDRESS", address)
    with pytest.raises(br.ConfigError, match=rf"^RAY_ADDRESS='{address}' \(from the environment"):
        session._check_reachable(None)


def test_an_address_that_answers_and_ray_s_own_forms_pass(monkeypatch):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        session._check_reachable(f"127.0.0.1:{server.getsockname()[1]}")
    for left_to_ray in ("auto", "ray://head:10001"):
        session._check_reachable(left_to_ray)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    session._check_reachable(None)  # a local Ray


def test_ray_s_client_is_quiet_only_while_joining(capfd):
    with session._quiet_client(True):
        os.write(2, b"gcs_client.cc:210: Failed to get cluster ID\n")  # as Ray's C++ writes
    os.write(2, b"after\n")
    with session._quiet_client(False):
        os.write(2, b"verbose\n")
    err = capfd.readouterr().err
    assert "gcs_client" not in err and "after" in err and "verbose" in err
