"""shared/heap.py: after start-up each service freezes its start-up objects and raises the young
generation's threshold, and cyclic garbage made afterwards is still collected on its own."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from shared.heap import YOUNG_THRESHOLD
from shared.processes import LISTENING, free_port
from tests.conftest import SERVICE_TOKEN
from tests.e2e.conftest import gateway_process_env

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parent.parent
FROZEN = re.compile(r"garbage collector: (\d+) objects frozen, thresholds \((\d+), ")


def run_python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


def test_settle_freezes_what_is_alive_and_raises_the_young_threshold() -> None:
    out = run_python(
        """
        import gc
        from shared import heap
        before = gc.get_freeze_count()
        frozen = heap.settle()
        print(before, frozen, gc.get_freeze_count(), gc.get_threshold()[0], gc.isenabled())
        """
    )
    before, frozen, count, young, enabled = out.split()
    assert int(before) == 0
    assert int(frozen) == int(count) > 1_000  # the interpreter's and the imports' objects
    assert int(young) == YOUNG_THRESHOLD
    assert enabled == "True"


def test_cycles_made_after_settling_are_still_collected_without_asking() -> None:
    # Cycles are never freed by reference counting: only the collector, running by itself once
    # enough of them pile up, can free the first one.
    out = run_python(
        f"""
        import gc, weakref
        from shared import heap
        heap.settle()
        young_sweeps = gc.get_stats()[0]["collections"]

        class Node:
            pass

        def cycle():
            a, b = Node(), Node()
            a.other, b.other = b, a
            return a

        first = weakref.ref(cycle())
        for _ in range({YOUNG_THRESHOLD}):
            cycle()
        print(first() is None, gc.get_stats()[0]["collections"] > young_sweeps)
        """
    )
    assert out.split() == ["True", "True"]


def test_each_collections_pause_is_reported_by_generation_within_a_second_or_so() -> None:
    out = run_python(
        """
        import gc, threading, time
        from shared import heap
        seen = []
        heap.watch_pauses(lambda generation, seconds: seen.append((generation, seconds)))
        heap.watch_pauses(lambda generation, seconds: seen.append(("twice", seconds)))
        gc.collect()
        gc.collect(0)
        deadline = time.monotonic() + 10
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(2 * heap.PAUSE_REPORT_SECONDS)  # a second watcher would have reported by now
        reporters = [t for t in threading.enumerate() if t.name == "gc-pauses"]
        generations = [g for g, _ in seen]
        print(generations[:2], "twice" in generations, all(s > 0 for _, s in seen), len(reporters))
        """
    )
    assert out.strip() == "[2, 0] False True 1"


def start_up_lines(module: str, env: dict[str, str]) -> list[str]:
    """The service's output up to its first 'listening on' line; the service is then stopped."""
    proc = subprocess.Popen(
        [sys.executable, "-m", module],
        cwd=ROOT,
        env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                break
            seen.append(line)
            if LISTENING.search(line):
                return seen
        raise AssertionError(f"{module} did not start:\n{''.join(seen)[-3000:]}")
    finally:
        proc.terminate()
        proc.wait(30)


def assert_settled_before_serving(lines: list[str]) -> None:
    found = [FROZEN.search(line) for line in lines]
    settled = [m for m in found if m]
    assert len(settled) == 1, "".join(lines)
    assert int(settled[0].group(1)) > 50_000  # the imports' objects (a ledger: ~120,000)
    assert int(settled[0].group(2)) == YOUNG_THRESHOLD


def test_the_ledger_settles_its_heap_before_it_says_it_listens(database_url: str) -> None:
    env = {
        "DATABASE_URL": database_url,
        "LEDGER_SERVICE_TOKEN": SERVICE_TOKEN,
        "LEDGER_ADDR": "127.0.0.1:0",
        "WORKERS": "1",
        "LOG_LEVEL": "INFO",
        "LOG_FORMAT": "text",
    }
    assert_settled_before_serving(start_up_lines("ledger_service", env))


def test_the_gateway_settles_its_heap_before_it_says_it_listens(tmp_path: Path) -> None:
    # No ledger needs to answer: the gateway starts before its first call to it.
    env = gateway_process_env(
        f"127.0.0.1:{free_port()}",
        f"http://127.0.0.1:{free_port()}",
        str(tmp_path),
        WORKERS="1",
        LOG_LEVEL="INFO",
        LOG_FORMAT="text",
    )
    assert_settled_before_serving(start_up_lines("gateway_service", env))
