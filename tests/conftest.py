"""Set-up for every test: one torch thread per process.

The tests run the tiny model, whose operations are too small to gain from a second
thread, and often on a machine whose cores are busy (the engine subprocesses the tests
start, another test run beside this one). There, torch's team of threads waits at every
operation for a thread that is not running: a tiny model's step took 30 times longer
with two threads than with one (1.6 s against 0.05 s a push, with another process busy
on one of two cores). Set before torch is imported, so this process and every engine
the tests start as a subprocess (which inherits it) run one thread.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
