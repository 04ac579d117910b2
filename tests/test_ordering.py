"""The file order of `make test` (tests/ordering.py), on a real pytest run of small files."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]
CONFTEST = """
import pytest
from tests.ordering import order_by_cost

def pytest_configure(config):
    config.addinivalue_line("markers", "slow: slow")
    config.addinivalue_line("markers", "cost(seconds): cost")

def pytest_collection_modifyitems(items):
    order_by_cost(items)
"""


def _module(marks: str) -> str:
    return f"import pytest\npytestmark = [{marks}]\ndef test_one(): pass\ndef test_two(): pass\n"


def test_files_run_costliest_first_and_keep_their_inner_order(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        test_a="def test_fast(): pass\n",
        test_b=_module("pytest.mark.slow, pytest.mark.cost(30)"),
        test_c=_module("pytest.mark.slow, pytest.mark.cost(300)"),
        test_d=_module("pytest.mark.cost(60)"),  # a costly file that is not end-to-end
    )
    result = pytester.runpytest("--collect-only", "-q", "-p", "no:randomly")
    assert result.ret == pytest.ExitCode.OK, result.outlines
    collected = [line for line in result.outlines if "::" in line]
    assert collected == [
        "test_c.py::test_one", "test_c.py::test_two", "test_d.py::test_one",
        "test_d.py::test_two", "test_b.py::test_one", "test_b.py::test_two",
        "test_a.py::test_fast",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("marks", "problem"),
    [
        ("pytest.mark.slow", "is marked slow but declares no pytest.mark.cost(seconds)"),
        ("pytest.mark.slow, pytest.mark.cost()", "has pytest.mark.cost(); expected one number"),
        ("pytest.mark.cost('long')", "has pytest.mark.cost('long'); expected one number"),
        ("pytest.mark.cost(0)", "has pytest.mark.cost(0); expected one number of seconds > 0"),
    ],
)
def test_a_slow_file_without_a_cost_stops_the_run_naming_it(
    pytester: pytest.Pytester, marks: str, problem: str
) -> None:
    """A renamed or new end-to-end file never falls silently to the end of the queue."""
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_renamed=_module(marks), test_other="def test_fast(): pass\n")
    result = pytester.runpytest("--collect-only", "-q")
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.outlines
    assert f"test_renamed.py {problem}" in result.stderr.str()
