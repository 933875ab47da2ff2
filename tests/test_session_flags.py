"""The test session's XLA settings (tests/conftest.py): the compile-time cuts are on, and only flags
the installed XLA knows are set (it aborts the process on an unknown one)."""

import os

import conftest


def test_the_session_compiles_at_llvm_level_0_with_the_loop_emitters_where_xla_has_them():
    flags = os.environ["XLA_FLAGS"].split()
    assert conftest.OPT_LEVEL in flags
    assert conftest.xla_knows(conftest.OPT_LEVEL)
    known = all(map(conftest.xla_knows, conftest.LOOP_EMITTERS))
    assert all((f in flags) == known for f in conftest.LOOP_EMITTERS)


def test_a_flag_xla_does_not_have_is_not_known():
    assert not conftest.xla_knows("--xla_cpu_no_such_flag_in_any_jaxlib=true")


def test_the_slow_files_are_handed_out_first_in_their_order_and_each_file_stays_in_order():
    class Item:
        def __init__(self, nodeid):
            self.nodeid = nodeid

    first, second = conftest.SLOW_FILES[:2]
    ids = ["tests/test_a.py::x", f"{second}::p", "tests/test_b.py::y", f"{first}::q", f"{second}::r", "tests/test_a.py::z"]
    got = [i.nodeid for i in conftest.slow_files_first([Item(i) for i in ids])]
    assert got == [f"{first}::q", f"{second}::p", f"{second}::r", "tests/test_a.py::x", "tests/test_b.py::y",
                   "tests/test_a.py::z"]


def test_every_slow_file_exists(request):
    root = request.config.rootpath
    assert [f for f in conftest.SLOW_FILES if not (root / f).is_file()] == []
