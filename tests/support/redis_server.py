"""A Redis server of its own, in a container of the compose file's Redis image, for the
publish tests and `bench/publish_speed.py`."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator

REDIS_IMAGE_DEFAULT = "redis:7.2-bookworm"  # docker-compose.yaml's default for $REDIS_IMAGE


@contextlib.contextmanager
def running_redis(name_prefix: str) -> Iterator[int]:
    """Start $REDIS_IMAGE on a free loopback port, wait until it answers PING, yield the
    port; the container is removed on exit."""
    import redis

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    name = f"{name_prefix}-{uuid.uuid4().hex[:8]}"
    image = os.environ.get("REDIS_IMAGE", REDIS_IMAGE_DEFAULT)
    subprocess.run(["docker", "run", "-d", "--rm", "--name", name, "-p", f"127.0.0.1:{port}:6379",
                    image], check=True, capture_output=True, timeout=120)
    try:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 60
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield port
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60)
