"""SpoutGL for a process a test starts (an engine): the fake in tests/fake_spoutgl.py,
over the Spout state in the folder named by $FAKE_SPOUT_DIR. Put this folder and
tests/ on the process's PYTHONPATH."""

import os

from fake_spoutgl import FOLDER_ENV, FakeSpoutMachine

_module = FakeSpoutMachine(os.environ[FOLDER_ENV]).module()
SpoutReceiver, SpoutSender, enums = _module.SpoutReceiver, _module.SpoutSender, _module.enums
