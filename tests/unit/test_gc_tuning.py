"""pdserve.gc_tuning.settle_heap, in a child process (it changes the whole process's collector):
start-up objects frozen, the young threshold raised, cycles made afterwards still collected."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from pdserve.gc_tuning import settle_heap

CHILD = textwrap.dedent(
    """
    import gc, json, weakref
    from pdserve.gc_tuning import settle_heap

    class Node:
        pass

    settle_heap(5000)
    frozen, thresholds = gc.get_freeze_count(), gc.get_threshold()
    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle made after start-up
    gone = weakref.ref(a)
    del a, b
    gc.collect()
    settle_heap(100)  # a lower threshold keeps the higher one
    print(json.dumps({"frozen": frozen, "thresholds": thresholds, "cycle_collected": gone() is None,
                      "kept": gc.get_threshold()[0]}))
    """
)


def test_settle_heap_freezes_startup_and_still_collects_new_cycles():
    import json

    out = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60, check=True
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["frozen"] > 1000  # the interpreter's and the imports' objects
    assert got["thresholds"][0] == 5000
    assert got["cycle_collected"]
    assert got["kept"] == 5000


def test_settle_heap_refuses_a_threshold_below_one():
    with pytest.raises(ValueError, match="young_threshold"):
        settle_heap(0)
