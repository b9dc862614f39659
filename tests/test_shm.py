"""Shared-memory frame ring: real segments, and a real second process where it matters."""

import os
import shutil
import signal
import subprocess
import sys
import time
from multiprocessing import shared_memory
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from processes import PATIENCE_S
from bridge.protocol import MAX_INT, ErrorCode, ProtocolError
from bridge.shm import MAX_NAME_CHARS, RingReader, RingWriter, list_rings, reclaim_abandoned_rings, session_ring_names

pytestmark = pytest.mark.timeout(3 * PATIENCE_S)  # room for a test's waits to time out and say what never came

REPO = Path(__file__).resolve().parents[1]
DEV_SHM = Path("/dev/shm")
linux_only = pytest.mark.skipif(not DEV_SHM.is_dir(), reason="needs /dev/shm (Linux)")


def ring_segments() -> set[str]:
    """The segments of the rings this test run could have left: written by this process or one
    of its children, or by a process that is gone. (Another copy of the suite running beside
    this one has live rings of its own, which are not this run's to count.)"""
    return {segment for ring in list_rings() if _ours_or_gone(ring.owner_pid) for segment in ring.segments}


def _ours_or_gone(pid: int) -> bool:
    while pid > 1:
        if pid == os.getpid():
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])  # its parent
        except (OSError, ValueError, IndexError):
            return True  # gone
    return False


@pytest.fixture(autouse=True)
def no_segments_left_behind():
    before = ring_segments()
    yield
    assert ring_segments() - before == set()


def frame(value: int, height: int = 4, width: int = 6, channels: int = 4) -> np.ndarray:
    return np.full((height, width, channels), value % 256, np.uint8)


def python(code: str, *args: str, **popen_args) -> subprocess.Popen:
    """Run code in a fresh interpreter: a separate process with its own resource tracker."""
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], cwd=REPO, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen_args,
    )


def test_a_written_frame_is_read_once_with_its_seq_and_time():
    with RingWriter.create(6, 4) as writer, RingReader.attach(writer.name) as reader:
        assert reader.read_latest() is None  # nothing written yet
        pixels = np.random.default_rng(0).integers(0, 256, (4, 6, 4), dtype=np.uint8)
        writer.write(pixels, seq=5, t_capture_ns=1234)
        got = reader.read_latest()
        assert (got.seq, got.t_capture_ns) == (5, 1234)
        assert np.array_equal(got.pixels, pixels)
        assert reader.read_latest() is None  # nothing new since


def test_the_returned_frame_is_the_callers_copy():
    with RingWriter.create(6, 4) as writer, RingReader.attach(writer.name) as reader:
        writer.write(frame(1), 1, 1)
        got = reader.read_latest()
        for seq in (2, 3, 4):  # every one of the three slots written over
            writer.write(frame(seq), seq, seq)
        assert (got.pixels == 1).all()


def test_a_frame_can_be_read_into_a_buffer_of_the_callers():
    with RingWriter.create(6, 4) as writer, RingReader.attach(writer.name) as reader:
        buffer = np.zeros((4, 6, 4), np.uint8)
        writer.write(frame(8), 8, 8)
        got = reader.read_latest(out=buffer)
        assert got.pixels is buffer and (buffer == 8).all()
        writer.write(frame(9), 9, 9)
        for wrong in (np.zeros((4, 6, 3), np.uint8), np.zeros((4, 6, 4), np.float32)):
            with pytest.raises(ProtocolError) as caught:
                reader.read_latest(out=wrong)
            assert caught.value.field == "pixels"
        writer.resize(2, 2)
        writer.write(frame(10, 2, 2), 10, 10)
        with pytest.raises(ProtocolError):
            reader.read_latest(out=buffer)  # the frame size changed under it
        buffer = np.empty((reader.height, reader.width, 4), np.uint8)
        assert reader.read_latest(out=buffer).seq == 10  # the refused read did not consume it


def test_a_frame_can_be_written_straight_into_its_slot_and_a_failed_fill_publishes_nothing():
    with RingWriter.create(6, 4) as writer, RingReader.attach(writer.name) as reader:
        writer.write_in_place(lambda slot: slot.fill(5), 5, 50)
        got = reader.read_latest()
        assert (got.seq, got.t_capture_ns) == (5, 50) and (got.pixels == 5).all()

        def fails_half_way(slot):
            slot[:2] = 6
            raise RuntimeError("the conversion failed")

        with pytest.raises(RuntimeError):
            writer.write_in_place(fails_half_way, 6, 60)
        assert reader.read_latest() is None
        with RingReader.attach(writer.name) as newcomer:  # has read nothing yet: gets the last whole frame
            got = newcomer.read_latest()
            assert got.seq == 5 and (got.pixels == 5).all()
        writer.write(frame(7), 7, 70)  # into the slot the failed fill left
        assert reader.read_latest().seq == 7


def test_a_reader_that_falls_behind_skips_to_the_newest_frame():
    with RingWriter.create(6, 4, slots=2) as writer, RingReader.attach(writer.name) as reader:
        for seq in range(10):
            writer.write(frame(seq), seq, seq)
        got = reader.read_latest()
        assert got.seq == 9 and (got.pixels == 9).all()
        assert reader.read_latest() is None
        assert reader.skipped == 9  # counted, so the reader can report them as dropped


@linux_only
def test_a_ring_that_does_not_fit_in_free_shared_memory_is_refused_before_it_is_made(monkeypatch):
    # An oversized segment would be made fine, then kill its writer with SIGBUS mid-frame.
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=4096))
    with pytest.raises(OSError, match="shared memory is full"):
        RingWriter.create(64, 64, name="sdb_too_big")
    assert not any(name.startswith("sdb_too_big") for name in ring_segments())


def test_readers_are_independent():
    with RingWriter.create(6, 4) as writer, RingReader.attach(writer.name) as first, \
            RingReader.attach(writer.name) as second:
        writer.write(frame(1), 1, 1)
        assert first.read_latest().seq == 1
        writer.write(frame(2), 2, 2)
        assert second.read_latest().seq == 2
        assert first.read_latest().seq == 2


def test_resize_bumps_the_generation_and_readers_follow():
    with RingWriter.create(6, 4) as writer, RingReader.attach(writer.name) as reader:
        writer.write(frame(1), 1, 1)
        assert reader.read_latest().pixels.shape == (4, 6, 4)
        writer.write(frame(2), 2, 2)  # written before the resize: gone with the old size
        writer.resize(8, 5, "rgb8")
        assert writer.generation == 2
        assert reader.read_latest() is None
        assert (reader.generation, reader.width, reader.height, reader.format) == (2, 8, 5, "rgb8")
        writer.write(frame(3, 5, 8, 3), 3, 3)
        got = reader.read_latest()
        assert got.seq == 3 and got.pixels.shape == (5, 8, 3)


def test_what_no_ring_writer_writes_is_refused_naming_the_field_and_the_reader_goes_on():
    """The writer's memory may hold anything (another language's writer, a bug, a forgery):
    its lies are the reader's errors, never its crashes. Forged here in the writer's own views."""
    with RingWriter.create(6, 4) as writer, RingReader.attach(writer.name) as reader:
        writer.write(frame(1), 1, 1)
        writer._frames.slots["seq"][0] = -1
        with pytest.raises(ProtocolError) as refused:
            reader.read_latest()
        assert (refused.value.code, refused.value.field) == (ErrorCode.OUT_OF_RANGE, "seq")
        assert reader.read_latest() is None  # that frame is skipped, not refused again
        writer.write(frame(2), 2, 2)
        writer._frames.slots["publish"][1] = 2**64 - 1  # the count of frames it claims to have written
        assert reader.read_latest().seq == 2 and reader.skipped == MAX_INT  # bounded, for stats to carry

        writer.resize(6, 4)  # a new block: the lying count stays with the old one
        writer._frames.header["height"] = 2**63  # before the reader follows
        for _ in range(2):  # refused at every read until the writer makes another block
            with pytest.raises(ProtocolError) as refused:
                reader.read_latest()
            assert refused.value.field == "height"
        assert reader.writer_generation == 2 and reader.generation == 1
        writer.resize(6, 4)
        writer.write(frame(3), 3, 3)
        assert reader.read_latest().seq == 3 and reader.generation == 3


def test_a_reader_catches_up_over_several_resizes():
    with RingWriter.create(6, 4) as writer, RingReader.attach(writer.name) as reader:
        for size in (8, 10, 12):
            writer.resize(size, size)
        writer.write(frame(7, 12, 12), 7, 7)
        assert reader.read_latest().seq == 7
        assert reader.generation == writer.generation == 4


@linux_only
def test_resize_removes_the_old_frame_block_even_while_a_reader_maps_it():
    with RingWriter.create(6, 4) as writer, RingReader.attach(writer.name) as reader:
        writer.resize(8, 8)
        assert ring_segments() >= {writer.name, f"{writer.name}_2"}
        assert f"{writer.name}_1" not in ring_segments()
        writer.write(frame(1, 8, 8), 1, 1)
        assert reader.read_latest().seq == 1


def test_heartbeat_and_shutdown_tell_readers_whether_the_writer_is_alive():
    writer = RingWriter.create(6, 4)
    reader = RingReader.attach(writer.name)
    try:
        assert reader.owner_pid == os.getpid()
        assert reader.writer_alive(timeout_s=60)
        time.sleep(0.05)
        assert not reader.writer_alive(timeout_s=0.01)  # no sign of life for 50 ms
        writer.heartbeat()
        assert reader.writer_alive(timeout_s=60)
        writer.write(frame(1), 1, 1)
        writer.close()
        assert not reader.writer_alive(timeout_s=60)
        assert reader.read_latest().seq == 1  # the last frame is still readable
        assert reader.read_latest() is None
    finally:
        writer.close()
        reader.close()


def test_bad_arguments_and_frames_are_refused():
    with pytest.raises(ValueError):
        RingWriter.create(6, 4, name="no/slashes")
    with pytest.raises(ValueError):
        RingWriter.create(6, 4, name="x" * (MAX_NAME_CHARS + 1))
    with pytest.raises(ValueError):
        RingWriter.create(6, 4, slots=1)
    with pytest.raises(ProtocolError) as caught:
        RingWriter.create(100_000, 100_000)
    assert caught.value.field == "width"
    with pytest.raises(ProtocolError) as caught:
        RingWriter.create(6, 4, "yuv420")
    assert caught.value.field == "format"
    with RingWriter.create(6, 4) as writer:
        with pytest.raises(FileExistsError):
            RingWriter.create(6, 4, name=writer.name)
        for bad in (frame(1, 5, 6), frame(1).astype(np.uint16), frame(1, channels=3)):
            with pytest.raises(ProtocolError) as caught:
                writer.write(bad, 1, 1)
            assert (caught.value.code, caught.value.field) == (ErrorCode.SIZE_MISMATCH, "pixels")
        with pytest.raises(ProtocolError) as caught:
            writer.write(frame(1), -1, 1)
        assert caught.value.field == "seq"


def test_attaching_to_a_missing_or_foreign_segment_fails_clearly():
    with pytest.raises(FileNotFoundError):
        RingReader.attach("sdb_nosuchring")
    foreign = shared_memory.SharedMemory("sdb_foreign_test", create=True, size=4096)
    try:
        with pytest.raises(ProtocolError) as caught:
            RingReader.attach("sdb_foreign_test")
        assert caught.value.field == "magic"
    finally:
        foreign.close()
        foreign.unlink()


@linux_only
def test_a_ring_still_being_created_counts_as_not_there_yet():
    import _posixshmem

    # Its creator has opened the control block but not sized it yet.
    fd = _posixshmem.shm_open("/sdb_unsized_test", os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
    try:
        with pytest.raises(FileNotFoundError, match="still being created"):
            RingReader.attach("sdb_unsized_test")
    finally:
        os.close(fd)
        _posixshmem.shm_unlink("/sdb_unsized_test")


LYING_OWNER = """
import sys
from bridge.shm import RingWriter

ring = RingWriter.create(6, 4)
ring._control["owner_pid"] = int(sys.argv[1])  # what a writer claims: any 64 bits
print(ring.name, flush=True)
sys.stdin.readline()
"""


@linux_only
@pytest.mark.parametrize("owner_pid", [0, 2**31, 2**64 - 1])
def test_a_ring_whose_owner_pid_no_process_can_have_is_reclaimed(owner_pid):
    owner = python(LYING_OWNER, str(owner_pid), start_new_session=True)
    try:
        ring = owner.stdout.readline().strip()
        assert {ring, f"{ring}_1"} <= set(reclaim_abandoned_rings())
    finally:
        os.killpg(owner.pid, signal.SIGKILL)  # with its resource tracker, which would unlink them again
        owner.communicate()


@linux_only
def test_segments_are_private_to_their_owner():
    with RingWriter.create(6, 4) as writer:
        for name in (writer.name, f"{writer.name}_1"):
            assert (DEV_SHM / name).stat().st_mode & 0o777 == 0o600


def test_session_ring_names_are_distinct_valid_and_stable():
    inbound, outbound = session_ring_names("session-1")
    assert inbound != outbound
    assert session_ring_names("session-1") == (inbound, outbound)
    assert set(session_ring_names("session-2")).isdisjoint({inbound, outbound})
    with RingWriter.create(6, 4, name=inbound) as a, RingWriter.create(6, 4, name=outbound) as b:
        assert (a.name, b.name) == (inbound, outbound)


def test_auto_names_differ():
    with RingWriter.create(6, 4) as a, RingWriter.create(6, 4) as b:
        assert a.name != b.name


# --------------------------------------------------------------- across processes

TORN_FRAME_WRITER = """
import sys
import numpy as np
from bridge.shm import RingWriter

name, count = sys.argv[1], int(sys.argv[2])
with RingWriter.create(512, 512, name=name, slots=2) as ring:
    print("ready", flush=True)
    sys.stdin.readline()  # the reader has attached
    pixels = np.empty((512, 512, 4), np.uint8)
    for seq in range(1, count + 1):
        pixels.fill(seq % 256)
        ring.write(pixels, seq, seq * 10)
    sys.stdin.readline()  # the reader has seen the last frame
"""


def test_no_torn_frames_while_another_process_writes_flat_out():
    count = 1500
    name = "sdb_torn_test"
    writer = python(TORN_FRAME_WRITER, name, str(count))
    try:
        assert writer.stdout.readline().strip() == "ready"
        with RingReader.attach(name) as reader:
            assert reader.owner_pid == writer.pid
            writer.stdin.write("go\n")
            writer.stdin.flush()
            seen = []
            deadline = time.monotonic() + PATIENCE_S
            while (not seen or seen[-1] < count) and time.monotonic() < deadline:
                got = reader.read_latest()
                if got is None:
                    continue
                # Every byte of frame n is n % 256: a torn frame would mix two values.
                assert got.pixels.min() == got.pixels.max() == got.seq % 256
                assert got.t_capture_ns == got.seq * 10
                seen.append(got.seq)
            assert seen and seen[-1] == count, f"the last frame never came within {PATIENCE_S:g} s; saw {seen[-3:]}"
            assert seen == sorted(set(seen))  # never an older frame, never the same one twice
        writer.stdin.write("close\n")
        writer.stdin.flush()
        assert writer.wait(timeout=PATIENCE_S) == 0, writer.stderr.read()
    finally:
        writer.kill()
        writer.wait()
        writer.stdout.close()
        writer.stderr.close()
        writer.stdin.close()


READER_PROCESS = """
import sys
from bridge.shm import RingReader

reader = RingReader.attach(sys.argv[1])
print(reader.read_latest().seq, flush=True)
reader.close()
"""


def test_a_reader_process_exiting_leaves_the_ring_in_place():
    # Before Python 3.13 the reader's resource tracker would unlink the ring at its exit.
    with RingWriter.create(6, 4) as writer:
        writer.write(frame(3), 3, 3)
        reader = python(READER_PROCESS, writer.name)
        out, err = reader.communicate(timeout=PATIENCE_S)
        assert reader.returncode == 0, err
        assert out.strip() == "3"
        assert "leaked" not in err
        writer.write(frame(4), 4, 4)
        with RingReader.attach(writer.name) as again:
            assert again.read_latest().seq == 4


IDLE_WRITER = """
import sys, time
from bridge.shm import RingWriter

ring = RingWriter.create(6, 4, name=sys.argv[1])
ring.resize(8, 8)
print("ready", flush=True)
time.sleep(60)
"""


@linux_only
def test_a_killed_writers_segments_are_removed():
    name = "sdb_crash_test"
    writer = python(IDLE_WRITER, name)
    try:
        assert writer.stdout.readline().strip() == "ready"
        assert {name, f"{name}_2"} <= ring_segments()
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=PATIENCE_S)
        deadline = time.monotonic() + PATIENCE_S  # its resource tracker notices, then removes them
        while {name, f"{name}_2"} & ring_segments() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not {name, f"{name}_2"} & ring_segments(), f"the segments were still there after {PATIENCE_S:g} s"
    finally:
        writer.kill()
        writer.wait()
        writer.communicate()
