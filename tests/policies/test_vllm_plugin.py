"""policies.vllm_plugin.bound_shm_spin: with GENPAGE_VLLM_SHM_SPIN_S set, a vLLM process waiting on its
shared-memory queue blocks on the writer's notification instead of spinning; unset, vLLM's own 1 s spin stays."""

import pytest

shm = pytest.importorskip("vllm.distributed.device_communicators.shm_broadcast")
zmq = pytest.importorskip("zmq")

from policies.vllm_plugin import SHM_SPIN_ENV, bound_shm_spin  # noqa: E402


@pytest.fixture
def reader(tmp_path):
    """A reader SpinCondition just after a read (inside vLLM's spin window), with its yields and polls counted."""
    bound_shm_spin()
    context = zmq.Context()
    address = f"ipc://{tmp_path / 'notify'}"
    writer = shm.SpinCondition(is_reader=False, context=context, notify_address=address)
    spin = shm.SpinCondition(is_reader=True, context=context, notify_address=address)
    calls = {"yield": 0, "poll": []}
    poll = spin.poller.poll

    def counted_poll(timeout=None):
        calls["poll"].append(timeout)
        return poll(timeout)

    spin.poller.poll = counted_poll
    spin.record_read()
    yield spin, calls
    writer.local_notify_socket.close(0)
    for s in (spin.local_notify_socket, spin.read_cancel_socket, spin.write_cancel_socket):
        s.close(0)
    context.term()


def test_unset_keeps_vllms_spin(reader, monkeypatch):
    spin, calls = reader
    monkeypatch.delenv(SHM_SPIN_ENV, raising=False)
    monkeypatch.setattr(shm, "sched_yield", lambda: calls.__setitem__("yield", calls["yield"] + 1))
    spin.wait(timeout_ms=5)
    assert calls == {"yield": 1, "poll": []} and spin.busy_loop_s == 1


def test_zero_blocks_on_the_notification_at_once(reader, monkeypatch):
    spin, calls = reader
    monkeypatch.setenv(SHM_SPIN_ENV, "0")
    monkeypatch.setattr(shm, "sched_yield", lambda: calls.__setitem__("yield", calls["yield"] + 1))
    spin.wait(timeout_ms=5)  # nothing written: it waits on the notification socket for the 5 ms and returns
    assert calls == {"yield": 0, "poll": [5]} and spin.busy_loop_s == 0


def test_the_patch_is_installed_once():
    bound_shm_spin()
    wait = shm.SpinCondition.wait
    bound_shm_spin()
    assert shm.SpinCondition.wait is wait and wait._genpage_bounded
