"""pytest plugin: an unsafe fork fails the test that made it, with the guard's report.

A test suite is where a team should find out that their code forks while a native pool
runs, not production, so installing tokguard registers this plugin (entry point
``pytest11``) and the default is strict: the test that forked fails after it ran. Users
opt down with ``--tokguard=warn|raise|off``, the ``tokguard`` ini option, ``TOKGUARD_MODE``
or a marker (precedence: ini < env < command line < marker).

It is loaded in every pytest session of every project that installs tokguard, so it
imports nothing beyond tokguard itself (cheap) and pytest (already loaded), and each hook
is a few attribute lookups when nothing forks. The guard reports through
``tokguard.subscribe``; the plugin only attributes those reports to tests and fixtures.

pytest-forked is special: there pytest itself forks for every test, after session
fixtures may have started a pool. That fork is not the test's doing, so it fails no test;
it is reported once (naming the fixture that started the pool) and the guard's child
repair keeps the forked tests running.

pytest-forked 1.7.5 also cannot send pytest 9.2's test reports from the forked child to
pytest (it marshals ``report.__dict__``, which now holds a ``NodeId`` object): every forked
test fails with "EXITED with status 3". Where that is so, and only there, the plugin
converts the id the way pytest's own report serialisation does (ini ``tokguard_forked_reports``
switches it off).
"""

from __future__ import annotations

import _thread
import os
import sys

import pytest

from . import _config, _fork, _probes, _report
from ._report import FIXES, ForkReport, first_use_line, subscribe

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Generator, Iterator
    from typing import Any

    from _pytest.fixtures import FixtureDef, SubRequest
    from pluggy import Result

__all__ = ["TokguardReports"]

MODES = ("fail", "warn", "raise", "off")
ENV_MODES = _config.MODES  # TOKGUARD_MODE is read by the library too, which has no "fail"
DEFAULT_MODE = "fail"
# What the guard itself does in each plugin mode: "fail" lets the fork go on, repaired,
# and fails the test afterwards; "raise" refuses the fork before a child exists.
CORE_MODE = {"fail": "warn", "warn": "warn", "raise": "raise", "off": "off"}

HELP = (
    "what an unsafe fork (one made while a native thread pool runs) does to a test: "
    "'fail' (default) fails the test after it ran, with the report; 'warn' only reports; "
    "'raise' refuses the fork with tokguard.UnsafeForkError; 'off' turns the guard off. "
    "Precedence: ini option tokguard < env TOKGUARD_MODE (warn|raise|off) < --tokguard < marker."
)
ALLOW_MARKER = (
    "tokguard_allow(reason): allow unsafe forks in this test; they are still reported "
    "(tokguard mode 'warn' for this test). The reason is required."
)
MODE_MARKER = (
    "tokguard(mode): tokguard mode for this test, one of 'fail', 'warn', 'raise', 'off'; "
    "overrides --tokguard, TOKGUARD_MODE and the ini option."
)


def _choices(modes: tuple[str, ...]) -> str:
    return ", ".join(repr(m) for m in modes)


def _check(value: object, source: str, modes: tuple[str, ...] = MODES) -> str:
    """The mode ``value`` names, or a usage error naming the value, its source and the choices."""
    mode = value.strip().lower() if isinstance(value, str) else value
    if mode in modes:
        return str(mode)
    hint = ""
    if mode == "fail" and modes == ENV_MODES:
        hint = (
            " ('fail' is a pytest-only mode and is already the default; TOKGUARD_MODE is also "
            "read outside pytest. Use --tokguard=fail or the ini option instead.)"
        )
    raise pytest.UsageError(
        f"tokguard: {value!r} from {source} is not a valid mode; valid modes are "
        f"{_choices(modes)}.{hint}"
    )


def resolve_mode(config: pytest.Config) -> tuple[str, str]:
    """(mode, source) for the session; every layer that is set is validated, used or not.

    A bad value anywhere is a configuration mistake worth stopping for, even where a
    higher layer overrides it today.
    """
    mode, source = DEFAULT_MODE, "default"
    ini = config.getini("tokguard")
    if isinstance(ini, str) and ini.strip():
        where = (
            f"the ini option tokguard in {config.inipath}"
            if config.inipath
            else "the ini option tokguard"
        )
        mode, source = _check(ini, where), "ini"
    env = os.environ.get(_config.ENV_VAR, "")
    if env.strip():
        mode, source = _check(env, f"the environment variable {_config.ENV_VAR}", ENV_MODES), "env"
    cli = config.getoption("tokguard")
    if cli is not None:
        mode, source = _check(cli, "the command line option --tokguard"), "cli"
    return mode, source


def marker_mode(item: pytest.Item, session_mode: str) -> tuple[str, bool]:
    """(mode, explicit) for one test: its closest tokguard marker, else the session's mode.

    One walk over the markers (closest first) instead of one lookup per marker name: this
    runs for every test of every suite.
    """
    for marker in item.iter_markers():
        if marker.name == "tokguard":
            value = marker.kwargs.get("mode", marker.args[0] if marker.args else None)
            return _check(value, f"@pytest.mark.tokguard on {item.nodeid}"), True
        if marker.name == "tokguard_allow":
            reason = marker.kwargs.get("reason", marker.args[0] if marker.args else None)
            if not isinstance(reason, str) or not reason.strip():
                raise pytest.UsageError(
                    f"tokguard: @pytest.mark.tokguard_allow on {item.nodeid} needs a reason: "
                    '@pytest.mark.tokguard_allow(reason="why this test may fork unsafely")'
                )
            return "warn", True
    return session_mode, False


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else plural or word + 's'}"


def _short_path(path: str) -> str:
    try:
        relative = os.path.relpath(path)
    except ValueError:
        return path
    return path if relative.startswith(os.pardir) else relative


def _short_site(site: str | None) -> str:
    if not site:
        return "an unknown place"
    location, _, function = site.partition(" in ")
    path, _, line = location.rpartition(":")
    return f"{_short_path(path)}:{line} in {function}" if path else site


class _Entry:
    """One report as the plugin saw it: where in pytest it happened, and whether a child exists."""

    __slots__ = ("context", "forked", "report")

    def __init__(self, report: ForkReport, context: str | None) -> None:
        self.report = report
        self.context = context
        """``setup of fixture 'x' ...`` when a fixture was being set up at the fork."""
        self.forked = False
        """True once the fork really happened (a ``-W error`` filter can stop it)."""

    @property
    def repaired(self) -> bool:
        return self.forked and any(h.pool in _fork.REPAIRS for h in self.report.hazards)


_FIRST_USES = ("rayon_first_use", "tokio_first_use", "torch_first_use")
_POOL_OF = {
    "rayon_first_use": "tokenizers-rayon",
    "tokio_first_use": "tokenizers-tokio",
    "torch_first_use": "torch-openmp",
}


def _first_uses() -> tuple[str | None, ...]:
    # Same order as _FIRST_USES; spelled out because it runs around every test and fixture.
    return (_probes.rayon_first_use, _probes.tokio_first_use, _probes.torch_first_use)


def _fixture_where(fixturedef: FixtureDef[object]) -> str:
    code = getattr(fixturedef.func, "__code__", None)
    where = f", {_short_path(code.co_filename)}:{code.co_firstlineno}" if code is not None else ""
    return f"{fixturedef.scope}-scoped fixture {fixturedef.argname!r}{where}"


class TokguardReports:
    """The unsafe forks recorded during the running test (the ``tokguard_reports`` fixture).

    A live view: forks made after the fixture was requested show up too. Iterating gives
    ``tokguard.ForkReport`` objects.
    """

    def __init__(self, plugin: TokguardPlugin, mode: str) -> None:
        self._plugin = plugin
        self.mode = mode
        """The tokguard mode in force for this test (after ini, env, option and marker)."""

    def _reports(self) -> list[ForkReport]:
        return [entry.report for entry in self._plugin.item_entries]

    def __len__(self) -> int:
        return len(self._plugin.item_entries)

    def __iter__(self) -> Iterator[ForkReport]:
        return iter(self._reports())

    def __getitem__(self, index: int) -> ForkReport:
        return self._reports()[index]

    def __bool__(self) -> bool:
        return bool(self._plugin.item_entries)

    def __repr__(self) -> str:
        return f"<TokguardReports mode={self.mode!r} {self._reports()!r}>"

    def assert_none(self) -> None:
        """Fail here, with the reports, if this test has forked unsafely so far."""
        entries = self._plugin.item_entries
        if entries:
            raise AssertionError(
                f"expected no unsafe fork, got {len(entries)}:\n"
                + self._plugin.render(entries, None)
            )


class TokguardPlugin:
    """The session's state: the mode, what each test forked, and the summary counts."""

    def __init__(self, config: pytest.Config, mode: str, source: str) -> None:
        self.config = config
        self.mode = mode
        self.source = source
        self.item: pytest.Item | None = None
        self.item_mode = mode
        self.item_error: str | None = None
        self.item_entries: list[_Entry] = []
        self.pending: list[_Entry] = []  # not yet attributed to a phase's report
        self.outside: list[_Entry] = []  # forks while no test ran (collection, say)
        self.fixtures: list[FixtureDef[object]] = []  # being set up now, innermost last
        self.origins: dict[str, str] = {}  # pool -> where in the session it was first used
        self.awaiting: dict[int, _Entry] = {}  # thread -> entry whose fork is under way
        self.in_runner_fork = False
        self.runner_mode: str | None = None  # the guard's mode to restore in a forked child
        self.runner_first: tuple[str, _Entry] | None = None
        self.runner_printed = False
        self.forks = 0
        self.tests: set[str] = set()
        self.repaired = 0
        self.refused = 0
        self.runner_entries: list[_Entry] = []
        self.previous_mode: str | None = None
        self.outer: TokguardPlugin | None = None
        self.forked_reports: ForkedReports | None = None
        self.unsubscribe = subscribe(self._record)

    # --- the guard's side: called on every unsafe fork, in the forking thread --------------

    def _record(self, report: ForkReport) -> None:
        context = _fixture_where(self.fixtures[-1]) if self.fixtures else None
        entry = _Entry(report, f"setup of {context}" if context else None)
        self.awaiting[_thread.get_ident()] = entry
        if self.in_runner_fork:
            self._record_runner(entry)
        elif self.item is None:
            self.outside.append(entry)
        else:
            self.item_entries.append(entry)
            self.pending.append(entry)

    def _record_runner(self, entry: _Entry) -> None:
        # pytest-forked's fork is pytest's, not the test's: it is reported once, by this
        # plugin, so the guard's own warning is marked as given (under -W error it would
        # otherwise stop pytest-forked from forking at all).
        report = entry.report
        _report.mark_warned(report)
        nodeid = self.item.nodeid if self.item is not None else "?"
        self.runner_entries.append(entry)
        self.tests.add(nodeid)
        if self.runner_first is None:
            self.runner_first = (nodeid, entry)
            # Said now, before the fork: should a forked test hang anyway (a pool without a
            # repair), the explanation is already on the terminal.
            self.print_runner_report()

    def after_fork_in_parent(self) -> None:
        ident = _thread.get_ident()
        entry = self.awaiting.pop(ident, None)
        if entry is None:
            return
        judged = _fork._handoff.get(ident, entry.report)
        if judged is entry.report:  # not a stale entry of a fork that was stopped
            entry.forked = True

    def after_fork_in_child(self) -> None:
        self.awaiting.clear()
        if self.in_runner_fork:
            # This is the forked test's own process: its forks are the test's again.
            self.in_runner_fork = False
            if self.runner_mode is not None:
                _config.set_mode(self.runner_mode)
                self.runner_mode = None

    # --- pytest's side ------------------------------------------------------------------

    def note_origins(self, before: tuple[str | None, ...], where: str) -> None:
        for name, old, new in zip(_FIRST_USES, before, _first_uses(), strict=False):
            if old is None and new is not None:
                self.origins.setdefault(_POOL_OF[name], where)

    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item) -> Generator[None, None, None]:
        self.item = item
        self.item_entries = []
        self.pending = []
        self.item_error = None
        try:
            self.item_mode, explicit = marker_mode(item, self.mode)
        except pytest.UsageError as exc:
            self.item_mode, explicit, self.item_error = self.mode, False, str(exc)
        previous = _config.mode
        if explicit:
            _config.set_mode(CORE_MODE[self.item_mode])
        try:
            yield
        finally:
            if explicit:
                _config.set_mode(previous)
            self.outside.extend(self.pending)
            self.pending = []
            self.item = None

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        if self.item_error is not None:
            pytest.fail(self.item_error, pytrace=False)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_fixture_setup(
        self, fixturedef: FixtureDef[object], request: SubRequest
    ) -> Generator[None, None, None]:
        before = _first_uses()
        self.fixtures.append(fixturedef)
        try:
            yield
        finally:
            self.fixtures.pop()
            if before != _first_uses():
                self.note_origins(before, f"setup of {_fixture_where(fixturedef)}")

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, None, None]:
        before = _first_uses()
        yield
        if before != _first_uses():
            self.note_origins(before, f"test {item.nodeid}")

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, Result[pytest.TestReport], None]:
        outcome = yield
        if not self.pending:
            return
        entries, self.pending = self.pending, []
        if self.item_mode == "off":
            return
        self.annotate(outcome.get_result(), entries)

    def annotate(self, rep: pytest.TestReport, entries: list[_Entry]) -> None:
        """Put the reports on the phase's report, and fail it in mode 'fail'."""
        text = self.render(entries, self.item_mode)
        # Plain attributes travel with the report to pytest-forked's parent and xdist's
        # controller, which count them for the summary.
        rep.tokguard_forks = len(entries)  # type: ignore[attr-defined]
        rep.tokguard_repaired = sum(e.repaired for e in entries)  # type: ignore[attr-defined]
        rep.tokguard_refused = sum(e.report.refused for e in entries)  # type: ignore[attr-defined]
        if self.item_mode == "fail" and rep.passed:
            rep.outcome = "failed"
            rep.longrepr = text
        else:
            # A test that failed anyway, or mode warn/raise: the report goes with it.
            rep.sections.append((f"tokguard: unsafe fork during {rep.when}", text))

    def render(self, entries: list[_Entry], mode: str | None) -> str:
        """The reports of one phase, grouped: a fork in a loop is one paragraph, not twenty."""
        groups: dict[tuple[str | None, tuple[str, ...], str | None], list[_Entry]] = {}
        for entry in entries:
            key = (entry.report.fork_site, entry.report.pools, entry.context)
            groups.setdefault(key, []).append(entry)
        parts = []
        for (site, pools, context), group in groups.items():
            verb = "refused fork" if group[0].report.refused else "unsafe fork"
            head = f"tokguard: {_plural(len(group), verb)}"
            if context:
                head += f" during {context}"
            head += f" at {_short_site(site)} ({', '.join(pools)})"
            lines = [head, group[0].report.message]
            if not any(e.forked or e.report.refused for e in group):
                lines.append(
                    "  No child was created after all: a warnings filter (-W error, say) turned "
                    "tokguard's UnsafeForkWarning into an exception before the fork."
                )
            # A pool started by a fixture: its first-use line alone does not say which one.
            lines.extend(
                f"  The {pool} pool was started during {self.origins[pool]}."
                for pool in pools
                if self.origins.get(pool, "").startswith("setup of")
            )
            parts.append("\n".join(lines))
        if mode == "fail":
            parts.append(
                "tokguard mode 'fail': this test forked while a native pool was running, so it "
                "fails. To allow it here: @pytest.mark.tokguard_allow(reason=...); "
                "to only report such forks: --tokguard=warn."
            )
        return "\n\n".join(parts)

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        forks = getattr(report, "tokguard_forks", 0)
        if forks:
            self.forks += forks
            self.tests.add(report.nodeid)
            self.repaired += getattr(report, "tokguard_repaired", 0)
            self.refused += getattr(report, "tokguard_refused", 0)

    def print_runner_report(self) -> None:
        """Say once, as soon as it is known, that pytest-forked forks a process with pools."""
        if self.runner_first is None or self.runner_printed:
            return
        self.runner_printed = True
        nodeid, entry = self.runner_first
        report = entry.report
        lines = [
            f"pytest-forked forks this pytest process (pid {report.pid}) for every forked "
            f"test, and native pools already run in it (seen first when forking {nodeid}):"
        ]
        for hazard in report.hazards:
            lines.append(f"  - {hazard.title}: {hazard.evidence}")
            if hazard.pool in self.origins:
                lines.append(f"    started during {self.origins[hazard.pool]}")
            if hazard.first_use:
                lines.append(f"    {first_use_line(hazard.first_use)}")
            lines.append(f"    child repair: {hazard.repair or 'none possible'}")
        lines.append(
            "  Unrepaired, every forked test that uses such a pool would hang. tokguard repairs "
            "each forked child, so the tests run (without parallelism inside them). This is "
            "reported once; the forked tests are not failed for it."
        )
        lines.append("  Fix it for good, any one of:")
        lines.extend(f"  - {fix}" for fix in FIXES)
        lines.append("  - give the fixture function scope, so each forked test builds its own")
        self.write_section("tokguard: pytest-forked", "\n".join(lines))

    def write_section(self, title: str, text: str) -> None:
        terminal = self.config.pluginmanager.get_plugin("terminalreporter")
        if terminal is None:
            return
        terminal.ensure_newline()
        terminal.write_sep("-", title, yellow=True)
        for line in text.splitlines():
            terminal.write_line(line)
        terminal.flush()  # a forked child must not inherit (and repeat) buffered output

    @pytest.hookimpl
    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        # Said in the header under --forked; a session that forks only the tests marked
        # `forked` hears it at the first of them, and one that forks nothing never does.
        if self.forked_reports is None or not config.getoption("forked", False):
            return []
        return [self.forked_reports.announce()]

    @pytest.hookimpl
    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        runner = self.runner_entries
        outside = [e for e in self.outside if self.mode != "off"]
        forks = self.forks + len(runner) + len(outside)
        if not forks:
            return
        repaired = self.repaired + sum(e.repaired for e in runner + outside)
        line = (
            f"tokguard: {_plural(forks, 'unsafe fork')} in {_plural(len(self.tests), 'test')}, "
            f"{_plural(repaired, 'child', 'children')} repaired"
        )
        if self.refused:
            line += f", {self.refused} refused"
        if runner:
            line += f" ({len(runner)} by pytest-forked)"
        if outside:
            line += f" ({len(outside)} outside tests)"
        if outside and self.mode != "off":
            terminalreporter.write_sep("-", "tokguard: unsafe forks outside tests", yellow=True)
            terminalreporter.write_line(self.render(outside, None))
        terminalreporter.write_sep("=", line, yellow=True, bold=True)

    def close(self) -> None:
        self.unsubscribe()
        if self.previous_mode is not None:
            _config.set_mode(self.previous_mode)


class PytestForked:
    """Hooks for pytest-forked, registered only when that plugin is loaded."""

    def __init__(self, plugin: TokguardPlugin) -> None:
        self.plugin = plugin

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item) -> Generator[None, None, None]:
        if not (item.config.getoption("forked", False) or item.get_closest_marker("forked")):
            yield
            return
        plugin = self.plugin
        if plugin.forked_reports is not None and not plugin.forked_reports.announced:
            terminal = plugin.config.pluginmanager.get_plugin("terminalreporter")
            if terminal is not None:
                terminal.ensure_newline()
                terminal.write_line(plugin.forked_reports.announce())
                terminal.flush()
        plugin.in_runner_fork = True
        restore = None
        if _config.mode == "raise":
            # Refusing pytest-forked's own fork would stop the session, not the unsafe code;
            # the test's mode is put back in the child (after_fork_in_child).
            restore = plugin.runner_mode = "raise"
            _config.set_mode("warn")
        try:
            yield
        finally:
            plugin.in_runner_fork = False
            plugin.runner_mode = None
            if restore is not None:
                _config.set_mode(restore)


FORKED_REPORTS_HELP = (
    "convert test reports for pytest-forked where it cannot serialise them itself "
    "(pytest-forked 1.7.5 with pytest 9.2: every forked test fails with 'EXITED with "
    "status 3'); default true; false leaves pytest-forked as it is."
)


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


_KEY = pytest.StashKey[TokguardPlugin]()
_active: TokguardPlugin | None = None
_hooks_registered = False


def _after_in_parent() -> None:
    plugin = _active
    if plugin is not None:
        try:
            plugin.after_fork_in_parent()
        except Exception as exc:
            _report.internal_error("the pytest plugin's after-fork hook", exc)


def _after_in_child() -> None:
    plugin = _active
    if plugin is not None:
        try:
            plugin.after_fork_in_child()
        except Exception as exc:
            _report.internal_error("the pytest plugin's after-fork hook in the child", exc)


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    _master_mode_under_forked(early_config)


def _master_mode_under_forked(config: pytest.Config) -> None:
    """Under pytest-forked's ``--forked`` this process is a preforking master.

    It imports conftests and test modules (their module-level code runs here) and forks a
    child for every test, so tokguard's master mode keeps its pools cold and each forked
    test gets the full thread count back. Decided here, before the initial conftests load.
    xdist's controller starts its workers instead of forking them: not a master.
    """
    try:
        options = config.known_args_namespace
        switched_off = str(getattr(options, "tokguard", None)).strip().lower() == "off"
        if not getattr(options, "forked", False) or switched_off:
            return
        # xdist's controller: workers asked for (-n 0 runs the tests here, whatever --dist
        # says), or execnet gateways named with --tx.
        workers = getattr(options, "numprocesses", None)
        if "PYTEST_XDIST_WORKER" not in os.environ and (
            workers or (workers is None and getattr(options, "tx", None))
        ):
            return
        from . import _master

        _master.recognised(_master.PYTEST_FORKED)
    except Exception as exc:
        _report.internal_error("the pytest plugin's master-mode check", exc)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tokguard", "tokguard: unsafe forks")
    group.addoption("--tokguard", action="store", default=None, metavar="MODE", help=HELP)
    parser.addini("tokguard", HELP, default="")
    parser.addini("tokguard_forked_reports", FORKED_REPORTS_HELP, type="bool", default=True)


def pytest_configure(config: pytest.Config) -> None:
    global _active, _hooks_registered
    config.addinivalue_line("markers", ALLOW_MARKER)
    config.addinivalue_line("markers", MODE_MARKER)
    mode, source = resolve_mode(config)
    plugin = TokguardPlugin(config, mode, source)
    if source in ("ini", "cli"):
        # TOKGUARD_MODE was applied by the library at import; code that called
        # tokguard.configure() since is only overridden by an explicit pytest setting.
        plugin.previous_mode = _config.mode
        _config.set_mode(CORE_MODE[mode])
    config.stash[_KEY] = plugin
    config.pluginmanager.register(plugin, "tokguard-session")
    # pytest-forked registers as "pytest_forked" (entry point name); -p no:forked blocks both.
    if any(config.pluginmanager.hasplugin(name) for name in ("pytest_forked", "forked")):
        config.pluginmanager.register(PytestForked(plugin), "tokguard-forked")
        if config.getini("tokguard_forked_reports"):
            plugin.forked_reports = ForkedReports.install()
    plugin.outer = _active  # an in-process pytester session nests inside another
    _active = plugin
    if not _hooks_registered:
        _hooks_registered = True
        os.register_at_fork(after_in_parent=_after_in_parent, after_in_child=_after_in_child)


def pytest_unconfigure(config: pytest.Config) -> None:
    global _active
    plugin = config.stash.get(_KEY, None)
    if plugin is None:
        return
    plugin.close()
    if plugin.forked_reports is not None:
        plugin.forked_reports.uninstall()
    if _active is plugin:
        _active = plugin.outer


@pytest.fixture
def tokguard_reports(request: pytest.FixtureRequest) -> TokguardReports:
    """The unsafe forks recorded during this test; ``.assert_none()`` fails if there are any."""
    plugin = request.config.stash[_KEY]
    return TokguardReports(plugin, plugin.item_mode)
