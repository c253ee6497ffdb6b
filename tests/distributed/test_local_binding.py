"""Local runs stay local (issue 17). The whole pipeline run by `ensure_ray` (no cluster to join, as
`make run` starts it) is watched while it works in test_crash_recovery.py; here, the same watch on
the tests' own `ray start --head` cluster while `submitted` ran the pipeline through Ray Jobs, and
the watch's reading of /proc."""

from __future__ import annotations

import os
import socket
import sys

import pytest


def test_proc_addresses_and_loopback(socket_watch):
    assert socket_watch.address("0100007F") == "127.0.0.1"
    assert socket_watch.address("0000000000000000FFFF00000100007F") == "::ffff:127.0.0.1"
    assert socket_watch.address("00000000000000000000000001000000") == "::1"
    assert [socket_watch.is_loopback(a) for a in ("127.0.0.1", "::1", "::ffff:127.0.0.1", "0.0.0.0", "::",
                                                  "192.0.2.2")] == [True, True, True, False, False, False]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_watch_fails_on_a_socket_beyond_loopback(socket_watch):
    with socket.create_server(("0.0.0.0", 0)) as exposed, socket.create_server(("127.0.0.1", 0)):
        socket_watch.sample(os.getpid(), force=True)
        port = exposed.getsockname()[1]
    assert any(addr == "0.0.0.0" and p == port for (_, addr, p) in socket_watch.seen), socket_watch.table()
    with pytest.raises(AssertionError, match="listening beyond loopback"):
        socket_watch.assert_local(())


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_tests_ray_head_listened_on_loopback_only_during_the_job(submitted, head_sockets):
    _, proc = submitted
    assert proc.returncode == 0, proc.stderr[-3000:]
    print("listening sockets of the tests' Ray head during the job:\n" + head_sockets.table())
    head_sockets.assert_local(("gcs_server", "raylet", "ray::RolloutWorker"), learner="ray::RayTrainWorker")
