"""A private NDI network on loopback, for tests that run the real NDI runtime (cyndilib's libndi).

libndi finds sources through mDNS, which on Linux means an avahi daemon reached over the
system D-Bus. Neither runs on a CI machine or in a container, so out of the box an NDI
finder lists nothing. NDI's "extra IPs" setting does not stand in for it once more than
one NDI process runs: each process listens on TCP 5960 with SO_REUSEPORT, so a finder
asking 127.0.0.1 meets only one of them, and cyndilib cannot connect to an address.

So a test starts its own: a D-Bus daemon whose socket is in a temporary folder, an
avahi-daemon on that bus restricted to loopback (allow-interfaces=lo), and an NDI
configuration that lets NDI use 127.0.0.1 only. Every NDI process of the test gets
`environment()`: DBUS_SYSTEM_BUS_ADDRESS pointing at the private bus (libavahi-client
reads it), and NDI_CONFIG_DIR at the configuration. Nothing of the machine's own is
touched, except avahi-daemon's pid file, which it keeps in /run/avahi-daemon, and mDNS on
loopback, which every avahi-daemon there hears: so one such network runs at a time on a
machine. `start` takes a machine-wide lock first (another copy of the suite running beside
this one waits its turn, which takes longer but does not fail) and waits for a stale daemon
to go.

    with NdiNetwork.start(tmp_path) as network:
        os.environ.update(network.environment())    # before cyndilib is first imported
        ...

Needs the avahi-daemon and dbus-daemon programs (apt install avahi-daemon dbus, as
.ci/run does) and root, as avahi-daemon refuses to run otherwise;
`NdiNetwork.missing()` says what is not there.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

START_TIMEOUT_S = 15.0
# Another copy of the suite holds the machine's one NDI network for its NDI tests: minutes at most.
LOCK_TIMEOUT_S = 900.0
LOCK_FILE = Path(tempfile.gettempdir()) / "sdbridge-ndi-network.lock"
AVAHI_PID_FILE = Path("/run/avahi-daemon/pid")

_BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
  </policy>
</busconfig>
"""

_AVAHI_CONFIG = """[server]
use-ipv4=yes
use-ipv6=no
allow-interfaces=lo
ratelimit-interval-usec=1000000
ratelimit-burst=1000
enable-dbus=yes
[wide-area]
enable-wide-area=no
[publish]
publish-hinfo=no
publish-workstation=no
[reflector]
[rlimits]
"""


def missing() -> str | None:
    """Why a private NDI network cannot be started here, or None when it can."""
    for program, package in (("dbus-daemon", "dbus"), ("avahi-daemon", "avahi-daemon")):
        if shutil.which(program) is None and not Path("/usr/sbin", program).exists():
            return f"{program} is not installed (apt install {package}; .ci/run does)"
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "the private NDI network (D-Bus, avahi) is for Linux"
    if os.geteuid() != 0:
        return "avahi-daemon runs only as root"
    return None


def _program(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


@dataclass
class NdiNetwork:
    folder: Path
    bus_address: str
    processes: list[subprocess.Popen] = field(default_factory=list)
    lock: object = None  # the open lock file, held while the network runs

    @classmethod
    def start(cls, folder: Path) -> NdiNetwork:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        socket = folder / "system_bus_socket"
        (folder / "bus.conf").write_text(_BUS_CONFIG.format(socket=socket))
        (folder / "avahi.conf").write_text(_AVAHI_CONFIG)
        ndi_config = folder / "ndi"
        ndi_config.mkdir(exist_ok=True)
        (ndi_config / "ndi-config.v1.json").write_text(json.dumps({
            "ndi": {"machinename": "sdbridge-test",
                    "networks": {"ips": "", "discovery": ""},
                    "adapters": {"allowed": ["127.0.0.1"]},
                    "multicast": {"recv": {"enable": False}, "send": {"enable": False}}}}))
        network = cls(folder, f"unix:path={socket}", lock=_machine_lock())
        try:
            _wait_for_stale_avahi()
            bus = subprocess.Popen([_program("dbus-daemon"), "--nofork", f"--config-file={folder / 'bus.conf'}"],
                                   stdout=subprocess.DEVNULL, stderr=open(folder / "dbus.log", "wb"))
            network.processes.append(bus)
            _wait_for(socket.exists, "the private D-Bus daemon", bus, folder / "dbus.log")
            avahi = subprocess.Popen(
                [_program("avahi-daemon"), "-f", str(folder / "avahi.conf"), "--no-drop-root", "--no-chroot",
                 "--no-rlimits", "--no-proc-title"],
                env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": network.bus_address},
                stdout=subprocess.DEVNULL, stderr=open(folder / "avahi.log", "wb"))
            network.processes.append(avahi)
            _wait_for(lambda: b"Server startup complete" in (folder / "avahi.log").read_bytes(),
                      "avahi-daemon", avahi, folder / "avahi.log")
        except BaseException:
            network.close()
            raise
        return network

    def environment(self) -> dict[str, str]:
        """What every NDI process of the test needs in its environment."""
        return {"DBUS_SYSTEM_BUS_ADDRESS": self.bus_address, "NDI_CONFIG_DIR": str(self.folder / "ndi")}

    def close(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.processes.clear()
        if self.lock is not None:
            self.lock.close()  # closing the file releases the lock
            self.lock = None

    def __enter__(self) -> NdiNetwork:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _wait_for(condition, what: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not condition():
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}: {log.read_text(errors='replace')[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start in {START_TIMEOUT_S:g} s: "
                               f"{log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.02)


def _machine_lock():
    """The machine's one NDI network, for this test: waits while another process holds it."""
    lock = open(LOCK_FILE, "a")
    deadline = time.monotonic() + LOCK_TIMEOUT_S
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return lock
        except BlockingIOError:
            if time.monotonic() > deadline:
                lock.close()
                raise RuntimeError(f"another process has held the machine's NDI test network ({LOCK_FILE}) for "
                                   f"{LOCK_TIMEOUT_S:g} s; is a stuck test run still going?") from None
            time.sleep(0.2)


def _wait_for_stale_avahi() -> None:
    """avahi-daemon refuses to start while its pid file names a live process (another test's)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while AVAHI_PID_FILE.exists():
        try:
            os.kill(int(AVAHI_PID_FILE.read_text().split()[0]), 0)
        except (ValueError, IndexError, ProcessLookupError):
            AVAHI_PID_FILE.unlink(missing_ok=True)  # its process is gone
            return
        except PermissionError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"another avahi-daemon runs ({AVAHI_PID_FILE}); stop it to run the NDI tests")
        time.sleep(0.1)
