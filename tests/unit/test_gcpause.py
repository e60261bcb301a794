import gc

import pytest

from segguard.gcpause import gc_paused


def test_collector_is_paused_inside_and_restored_after_errors_and_nesting():
    assert gc.isenabled()
    with pytest.raises(ValueError):
        with gc_paused():
            assert not gc.isenabled()
            with gc_paused():
                assert not gc.isenabled()
            assert not gc.isenabled()  # the inner exit does not re-enable it early
            raise ValueError
    assert gc.isenabled()


def test_left_disabled_if_it_was_disabled():
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
