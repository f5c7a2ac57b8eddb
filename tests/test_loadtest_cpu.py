"""``benchmarks/loadtest.py``'s CPU accounting (``cpu_seconds``): the CPU time of a real process,
of a real Redis and of this process, each read where the kernel and Redis keep it."""

from __future__ import annotations

import subprocess
import sys
import time

import redis

from producer.client import redis_py_url
from tests.benchmark_scripts import load_benchmark


def _burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_cpu_seconds_of_a_busy_process_redis_and_this_one(broker_url):
    bench = load_benchmark("loadtest")
    client = redis.Redis.from_url(redis_py_url(broker_url))
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nend = time.process_time() + 0.6\n"
         "while time.process_time() < end: pass\nsys.stdin.read()"],
        stdin=subprocess.PIPE,
    )  # fmt: skip
    try:
        before = bench.cpu_seconds(client, child.pid)
        _burn(0.3)
        pipe = client.pipeline(transaction=False)
        for i in range(20000):
            pipe.set(f"cpu-probe-{i % 50}", i)
        pipe.execute()
        time.sleep(1.0)  # the child's 0.6 s
        after = bench.cpu_seconds(client, child.pid)
    finally:
        child.stdin.close()  # type: ignore[union-attr]
        child.wait(10)
        client.delete(*[f"cpu-probe-{i}" for i in range(50)])
    spent = bench.cpu_spent(before, after)
    assert 0.3 <= spent["worker"] <= 1.0, spent  # the child's burn (clock ticks: 10 ms)
    assert spent["load_generator"] >= 0.3, spent  # this process's burn and its pipeline
    assert 0 < spent["redis"] < spent["load_generator"], spent  # the 20,000 SETs
    # a process that is gone reads -1, not an error
    gone = bench.cpu_seconds(client, child.pid)
    assert gone["worker"] == -1.0 and gone["redis"] > 0
    assert bench.cpu_spent(after, gone)["worker"] == -1.0  # not a negative difference
