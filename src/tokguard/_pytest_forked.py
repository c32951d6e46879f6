"""The pytest plugin's part for pytest-forked, imported only in sessions that load it.

Under pytest-forked, pytest itself forks for every forked test, after session fixtures (or
a conftest) may have started a pool. That fork is pytest's, not the test's: it fails no
test and is never refused (refusing it would stop the session, not the unsafe code). It is
reported once, naming where the pool was started, and the guard's child repair keeps the
forked tests running; inside the child, the test's own forks are the test's again.

pytest-forked 1.7.5 also cannot send pytest 9.2's test reports from the forked child to
pytest (it marshals ``report.__dict__``, which now holds a ``NodeId`` object): every forked
test fails with "EXITED with status 3". Where that is so, and only there, ``ForkedReports``
converts the id the way pytest's own report serialisation does.
"""

from __future__ import annotations

import sys

import pytest

from . import _config, _report
from ._report import fixes_for, render_hazards

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Generator
    from typing import Any

    from .pytest_plugin import TokguardPlugin, _Entry


class PytestForked:
    """pytest-forked's own forks (recorded, reported once, never refused) and its hooks."""

    def __init__(self, plugin: TokguardPlugin, config: pytest.Config) -> None:
        self.plugin = plugin
        self.config = config
        self.forking = False
        """True while pytest-forked forks the current test: the fork is pytest's."""
        self.child_mode: str | None = None
        """The guard's mode to put back in the forked child (``raise``, eased for the fork)."""
        self.entries: list[_Entry] = []
        self.first: tuple[str, _Entry] | None = None
        self.reports = ForkedReports.install() if config.getini("tokguard_forked_reports") else None

    def record(self, entry: _Entry) -> None:
        """pytest-forked's fork seen by the guard, in pytest's process, before the fork."""
        # Reported once, by this plugin, so the guard's own warning is marked as given
        # (under -W error it would otherwise stop pytest-forked from forking at all).
        _report.mark_warned(entry.report)
        item = self.plugin.item
        nodeid = item.nodeid if item is not None else "?"
        self.entries.append(entry)
        self.plugin.tests.add(nodeid)
        if self.first is None:
            self.first = (nodeid, entry)
            # Said now, before the fork: should a forked test hang anyway (a pool without a
            # repair), the explanation is already on the terminal.
            self.write(self.explain(nodeid, entry), "tokguard: pytest-forked")

    def after_fork_in_child(self) -> None:
        if self.forking:
            # This is the forked test's own process: its forks are the test's again.
            self.forking = False
            if self.child_mode is not None:
                _config.set_mode(self.child_mode)
                self.child_mode = None

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item) -> Generator[None, None, None]:
        if not (item.config.getoption("forked", False) or item.get_closest_marker("forked")):
            yield
            return
        if self.reports is not None and not self.reports.announced:
            self.write(self.reports.announce())
        self.forking = True
        restore = None
        if _config.mode == "raise":
            # Refusing pytest-forked's own fork would stop the session, not the unsafe code;
            # the test's mode is put back in the child (after_fork_in_child).
            restore = self.child_mode = "raise"
            _config.set_mode("warn")
        try:
            yield
        finally:
            self.forking = False
            self.child_mode = None
            if restore is not None:
                _config.set_mode(restore)

    @pytest.hookimpl
    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        # Said in the header under --forked; a session that forks only the tests marked
        # `forked` hears it at the first of them, and one that forks nothing never does.
        if self.reports is None or not config.getoption("forked", False):
            return []
        return [self.reports.announce()]

    def explain(self, nodeid: str, entry: _Entry) -> str:
        """Why pytest-forked's fork is reported, and what tokguard does about it."""
        report = entry.report
        origins = self.plugin.origins
        lines = [
            f"pytest-forked forks this pytest process (pid {report.pid}) for every forked "
            f"test, and native pools already run in it (seen first when forking {nodeid}):"
        ]
        lines.extend(
            render_hazards(
                report.hazards,
                extra=lambda h: [f"started during {origins[h.pool]}"] if h.pool in origins else [],
            )
        )
        lines.append(
            "  Unrepaired, every forked test that uses such a pool would hang. tokguard repairs "
            "each forked child, so the tests run (without parallelism inside them). This is "
            "reported once; the forked tests are not failed for it."
        )
        lines.append("  Fix it for good, any one of:")
        lines.extend(f"  - {fix}" for fix in fixes_for(report.hazards))
        lines.append("  - give the fixture function scope, so each forked test builds its own")
        return "\n".join(lines)

    def write(self, text: str, title: str | None = None) -> None:
        terminal = self.config.pluginmanager.get_plugin("terminalreporter")
        if terminal is None:
            return
        terminal.ensure_newline()
        if title is not None:
            terminal.write_sep("-", title, yellow=True)
        for line in text.splitlines():
            terminal.write_line(line)
        terminal.flush()  # a forked child must not inherit (and repeat) buffered output

    def close(self) -> None:
        if self.reports is not None:
            self.reports.uninstall()


class ForkedReports:
    """pytest-forked's report serialisation, repaired where it fails.

    pytest-forked marshals a copy of ``report.__dict__``. Since pytest 9.2 the node id
    lives there as ``_id``, a ``NodeId`` object that marshal refuses, so the child dies
    before it can hand its reports back. pytest's own ``_report_to_json`` (what xdist
    uses) writes ``_id`` as the ``nodeid`` string, which ``TestReport(**d)`` accepts on
    the other side; this does the same, and nothing else.

    Whether it is needed is found by trying, not by reading versions: a report is
    serialised the way pytest-forked does and marshalled. A pytest-forked that works
    on its own is left alone.
    """

    def __init__(self, module: Any, original: Callable[[Any], dict[str, Any]]) -> None:
        self.module = module
        self.original = original
        self.announced = False

    @staticmethod
    def broken(serialize: Callable[[Any], dict[str, Any]]) -> bool:
        """Whether a minimal passing report fails to go through ``serialize`` and marshal."""
        import marshal

        report = pytest.TestReport(
            "probe.py::probe", ("probe.py", 0, "probe"), {}, "passed", None, "call"
        )
        try:
            marshal.dumps(serialize(report))
        except ValueError:
            return True
        return False

    @classmethod
    def install(cls) -> ForkedReports | None:
        """Replace ``pytest_forked.serialize_report`` if (and only if) it fails; else None."""
        module: Any = sys.modules.get("pytest_forked")
        original = getattr(module, "serialize_report", None)
        if original is None or not callable(original):
            return None
        try:
            if not cls.broken(original):
                return None
            fixer = cls(module, original)
            if cls.broken(fixer.serialize):
                return None  # broken in some other way: converting the id would not help
        except Exception as exc:
            _report.internal_error("checking pytest-forked's report serialisation", exc)
            return None
        module.serialize_report = fixer.serialize
        return fixer

    def serialize(self, report: Any) -> dict[str, Any]:
        data = self.original(report)
        if "_id" in data:
            data["nodeid"] = str(data.pop("_id"))
        return data

    def uninstall(self) -> None:
        if getattr(self.module, "serialize_report", None) == self.serialize:
            self.module.serialize_report = self.original

    def announce(self) -> str:
        """The line that says so, once; marks it said."""
        self.announced = True
        return (
            "tokguard converts pytest-forked's test reports, which pytest-forked cannot "
            "serialise on this pytest (switch off: -o tokguard_forked_reports=false)"
        )
