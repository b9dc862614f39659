"""syphon-python for a process a test starts (an engine): the fake in tests/fake_syphon.py,
over the Syphon servers in the folder named by $FAKE_SYPHON_DIR. Put this folder and
tests/ on the process's PYTHONPATH."""

import os
import sys

from fake_syphon import FOLDER_ENV, FakeSyphonMachine

_modules = FakeSyphonMachine(os.environ[FOLDER_ENV]).modules()
sys.modules.update(_modules)  # `import syphon` then gives the fake module, submodules and all
