"""The bench's services are ready before a figure is taken: a gateway prints its gRPC address
first and opens its HTTP edge after, so waiting for the first line alone let wrk start against a
port nobody accepted on yet (it failed with 'Connection refused')."""

from __future__ import annotations

import socket
import threading
import time

from shared import processes


def test_accepting_waits_for_a_listener_that_opens_late() -> None:
    port = processes.free_port()
    listener = socket.socket()

    def open_late() -> None:
        time.sleep(0.5)
        listener.bind(("127.0.0.1", port))
        listener.listen()

    opener = threading.Thread(target=open_late)
    opener.start()
    try:
        assert not processes.accepting(f"127.0.0.1:{port}", timeout=0.1)
        assert processes.accepting(f"127.0.0.1:{port}", timeout=5)
    finally:
        opener.join()
        listener.close()
