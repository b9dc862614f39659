"""Helpers for tests that run hosts and engines as real processes."""

import os
from multiprocessing import resource_tracker
from pathlib import Path

# A host that streams black frames over shared memory until it is killed; it prints its
# session id, then "streaming" once outputs come back. argv[1] is the engine's address.
HOST_PROCESS = """
import sys
import numpy as np
from bridge.client import EngineClient

with EngineClient(sys.argv[1], transport="shm", width=64, height=64, prompt="about to be killed") as client:
    print(client.session, flush=True)
    frame = np.zeros((64, 64, 4), np.uint8)
    announced = False
    while True:
        client.send(frame)
        if client.receive(0.005) is not None and not announced:
            print("streaming", flush=True)
            announced = True
"""


def child_pids() -> set[int]:
    """This process's children, less the resource tracker Python keeps for shared memory."""
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[1]) == os.getpid():
            children.add(int(stat.parent.name))
    return children - {resource_tracker._resource_tracker._pid}
