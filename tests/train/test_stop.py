"""Stopping on SIGTERM without a cross-host collective on every step."""

from __future__ import annotations

import signal

import numpy as np
import pytest
from jax.experimental import multihost_utils

from jaxgen.train import loop


class _Calls:
    """Counts calls of the two cross-host primitives a stop check could use."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, sync_step: int) -> None:
        self.allgather: list[int] = []
        self.sync_point: list[int] = []

        def allgather(x):
            self.allgather.append(int(x))
            return np.stack([x, np.array(True)])  # the other host was signalled

        def reached(step: int) -> bool:
            self.sync_point.append(step)
            return step == sync_step

        monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
        monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", reached)
        monkeypatch.setattr(loop.jax, "process_count", lambda: 2)


@pytest.mark.parametrize("service", [True, False], ids=["preemption-service", "no-service"])
def test_multi_process_stop_check_runs_no_collective_between_checkpoints(monkeypatch, service):
    calls = _Calls(monkeypatch, sync_step=7)
    monkeypatch.setattr(loop, "_preemption_service", lambda: service)
    agree = loop._StopAgreement(loop._StopSignal(), checkpoint_every=5)
    stops = [done for done in range(1, 11) if agree(done)]
    if service:
        # A local check per step; the coordination service picked step 7 in the background.
        assert calls.allgather == [] and calls.sync_point == list(range(1, 11))
        assert stops == [7]
        assert "this or another host" in agree.reason()
    else:
        # Flags compared at checkpoint steps only (5 and 10), never in between.
        assert len(calls.allgather) == 2 and calls.sync_point == []
        assert stops == [5, 10]
        assert agree.reason() == "SIGTERM on another host"


def test_single_process_uses_its_own_flag(monkeypatch):
    calls = _Calls(monkeypatch, sync_step=-1)
    monkeypatch.setattr(loop.jax, "process_count", lambda: 1)
    stop = loop._StopSignal()
    agree = loop._StopAgreement(stop, checkpoint_every=5)
    assert not agree(1)
    stop.received = "SIGTERM"
    assert agree(2) and agree.reason() == "SIGTERM"
    assert calls.allgather == [] and calls.sync_point == []


def test_sigterm_is_left_to_jax_when_its_notifier_runs(monkeypatch):
    """Under jax's preemption service only Ctrl-C gets a Python handler, and it becomes a SIGTERM
    to this process (which jax's C++ handler turns into a preemption notice for every host)."""
    sent = []
    monkeypatch.setattr(loop.os, "kill", lambda pid, sig: sent.append(sig))
    before = signal.getsignal(signal.SIGTERM)
    with loop._StopSignal(sigterm_to_jax=True) as stop:
        assert signal.getsignal(signal.SIGTERM) is before
        assert signal.getsignal(signal.SIGINT) == stop._handle
        stop._handle(signal.SIGINT, None)
    assert sent == [signal.SIGTERM] and stop.received == "SIGINT"
    with loop._StopSignal() as stop:
        assert signal.getsignal(signal.SIGTERM) == stop._handle


class _SyncManager:
    """jax's preemption sync manager in miniature: this host's counter is the last step it asked
    about (0 before it first asks); a notice sets the sync point one past the furthest host's."""

    def __init__(self) -> None:
        self.counter = 0
        self.sync_point = -1

    def reached_sync_point(self, step: int) -> bool:
        self.counter = step
        return step == self.sync_point

    def notice(self, other_counters: list[int]) -> None:
        self.sync_point = max(self.counter, *other_counters) + 1


def _two_hosts_with(monkeypatch: pytest.MonkeyPatch, manager: _SyncManager) -> None:
    from jax._src import distributed

    monkeypatch.setattr(distributed.global_state, "client", object())
    monkeypatch.setattr(distributed.global_state, "preemption_sync_manager", manager)
    monkeypatch.setattr(loop.jax, "process_count", lambda: 2)


def test_a_notice_while_restoring_stops_a_resumed_run_at_its_first_step(monkeypatch):
    """Without the resume step reported, both hosts count as at step 0 and the sync point is step
    1, which a run resumed at step 1000 never reaches."""
    manager = _SyncManager()
    _two_hosts_with(monkeypatch, manager)
    loop._report_resume_step(1000)
    # SIGTERM while both hosts restore step 1000; the other host ran the same start-up.
    manager.notice(other_counters=[manager.counter])
    agree = loop._StopAgreement(loop._StopSignal(), checkpoint_every=500)
    assert [done for done in range(1001, 1010) if agree(done)] == [1001]


def test_a_local_ctrl_c_names_itself_under_the_preemption_service(monkeypatch):
    _two_hosts_with(monkeypatch, _SyncManager())
    stop = loop._StopSignal(sigterm_to_jax=True)
    agree = loop._StopAgreement(stop, checkpoint_every=5)
    assert agree.reason() == "preemption notice (SIGTERM on this or another host)"
    stop.received = "SIGINT"
    assert agree.reason() == "SIGINT"
