"""The garbage-collector tuning of a long-lived server (questsig.tap.tune_gc): only the twistd
entry point turns it on, it freezes no garbage, and stopping the service undoes it."""
from __future__ import annotations

import gc
import weakref

from questsig import tap


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_tuning_freezes_no_garbage_and_is_undone() -> None:
    before = gc.get_threshold()
    frozen = gc.get_freeze_count()
    garbage = _Cycle()
    gone = weakref.ref(garbage)
    del garbage
    previous = tap.tune_gc()
    try:
        assert gone() is None  # collected before the freeze, not frozen with the rest
        assert gc.get_threshold() == tap.GC_THRESHOLD
        assert gc.get_freeze_count() > frozen
    finally:
        tap.untune_gc(previous)
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_only_the_twistd_entry_point_tunes() -> None:
    options = tap.Options()
    options.parseOptions(["--endpoint", "tcp:0:interface=127.0.0.1", "--mount", "/=hub"])
    assert tap.makeService(options).tune_gc is True
    assert tap.QuestsigService.tune_gc is False
