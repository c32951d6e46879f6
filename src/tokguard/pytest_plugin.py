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

The mode is resolved by module-level functions and hooks (the session's at configure, each
test's from its marker), the way pytest-timeout resolves its settings; ``TokguardPlugin``
keeps the session's record of unsafe forks. What pytest-forked needs (its own fork, its
reports on pytest 9.2) is in ``tokguard._pytest_forked``, imported only where it is loaded.
"""

from __future__ import annotations

import _thread
import os

import pytest

from . import _config, _fork, _report
from ._report import ForkReport, subscribe
from .pools import first_uses as _first_uses

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Generator, Iterator

    from _pytest.fixtures import FixtureDef, SubRequest
    from pluggy import Result

    from ._pytest_forked import PytestForked

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


def check_mode(value: object, source: str, modes: tuple[str, ...] = MODES) -> str:
    """The mode ``value`` names (any case), else a usage error from the library's validator.

    ``_config.validate`` also checks ``configure()`` and ``tokguard run --mode``, so every
    bad mode reads the same: where it came from, the value as written, the valid choices.
    """
    mode = value.strip().lower() if isinstance(value, str) else value
    try:
        # Any case is accepted; an error quotes the value as written, to be found and fixed.
        return _config.validate(mode if mode in modes else value, source, "a tokguard mode", modes)
    except ValueError as exc:
        hint = ""
        if mode == "fail" and modes == ENV_MODES:
            hint = (
                " ('fail' is a pytest-only mode and is already the default; TOKGUARD_MODE is "
                "also read outside pytest: use --tokguard=fail or the ini option instead)"
            )
        raise pytest.UsageError(f"{exc}{hint}") from None


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
        mode, source = check_mode(ini, where), "ini"
    env = os.environ.get(_config.MODE_VAR, "")
    if env.strip():
        where = f"the environment variable {_config.MODE_VAR}"
        mode, source = check_mode(env, where, ENV_MODES), "env"
    cli = config.getoption("tokguard")
    if cli is not None:
        mode, source = check_mode(cli, "the command line option --tokguard"), "cli"
    return mode, source


def marker_mode(item: pytest.Item, session_mode: str) -> tuple[str, bool]:
    """(mode, explicit) for one test: its closest tokguard marker, else the session's mode.

    One walk over the markers (closest first) instead of one lookup per marker name: this
    runs for every test of every suite.
    """
    for marker in item.iter_markers():
        if marker.name == "tokguard":
            value = marker.kwargs.get("mode", marker.args[0] if marker.args else None)
            return check_mode(value, f"@pytest.mark.tokguard on {item.nodeid}"), True
        if marker.name == "tokguard_allow":
            reason = marker.kwargs.get("reason", marker.args[0] if marker.args else None)
            if not isinstance(reason, str) or not reason.strip():
                raise pytest.UsageError(
                    f"@pytest.mark.tokguard_allow on {item.nodeid} needs a reason: "
                    '@pytest.mark.tokguard_allow(reason="why this test may fork unsafely")'
                )
            return "warn", True
    return session_mode, False


_ITEM_MODE = pytest.StashKey[str]()
_ITEM_ERROR = pytest.StashKey[str]()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, None, None]:
    """The test's mode, in force for the guard while the test (setup to teardown) runs."""
    session_mode = item.config.stash[_KEY].mode
    try:
        mode, explicit = marker_mode(item, session_mode)
    except pytest.UsageError as exc:
        # A bad marker errors its test (at setup), not the whole session.
        mode, explicit = session_mode, False
        item.stash[_ITEM_ERROR] = str(exc)
    item.stash[_ITEM_MODE] = mode
    previous = _config.mode
    if explicit:
        _config.set_mode(CORE_MODE[mode])
    try:
        yield
    finally:
        if explicit:
            _config.set_mode(previous)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    error = item.stash.get(_ITEM_ERROR, None)
    if error is not None:
        pytest.fail(error, pytrace=False)


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
        return self.forked and any(h.repair for h in self.report.hazards)


def _fixture_where(fixturedef: FixtureDef[object]) -> str:
    code = getattr(fixturedef.func, "__code__", None)
    where = f", {_short_path(code.co_filename)}:{code.co_firstlineno}" if code is not None else ""
    return f"{fixturedef.scope}-scoped fixture {fixturedef.argname!r}{where}"


def render(entries: list[_Entry], mode: str | None, origins: dict[str, str]) -> str:
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
            f"  The {pool} pool was started during {origins[pool]}."
            for pool in pools
            if origins.get(pool, "").startswith("setup of")
        )
        parts.append("\n".join(lines))
    if mode == "fail":
        parts.append(
            "tokguard mode 'fail': this test forked while a native pool was running, so it "
            "fails. To allow it here: @pytest.mark.tokguard_allow(reason=...); "
            "to only report such forks: --tokguard=warn."
        )
    return "\n\n".join(parts)


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
                + render(entries, None, self._plugin.origins)
            )


class TokguardPlugin:
    """The session's record: each unsafe fork, attributed to the test or fixture that made it."""

    def __init__(self, config: pytest.Config, mode: str) -> None:
        self.config = config
        self.mode = mode
        """The session's mode (ini, env, option); a test's own is in its stash."""
        self.item: pytest.Item | None = None
        self.item_entries: list[_Entry] = []
        self.pending: list[_Entry] = []  # not yet attributed to a phase's report
        self.outside: list[_Entry] = []  # forks while no test ran (collection, say)
        self.fixtures: list[FixtureDef[object]] = []  # being set up now, innermost last
        self.origins: dict[str, str] = {}  # pool -> where in the session it was first used
        self.awaiting: dict[int, _Entry] = {}  # thread -> entry whose fork is under way
        self.forks = 0
        self.tests: set[str] = set()
        self.repaired = 0
        self.refused = 0
        self.previous_mode: str | None = None
        self.outer: TokguardPlugin | None = None
        self.forked: PytestForked | None = None  # where pytest-forked is loaded
        self.unsubscribe = subscribe(self._record)

    # --- the guard's side: called on every unsafe fork, in the forking thread --------------

    def _record(self, report: ForkReport) -> None:
        context = _fixture_where(self.fixtures[-1]) if self.fixtures else None
        entry = _Entry(report, f"setup of {context}" if context else None)
        self.awaiting[_thread.get_ident()] = entry
        if self.forked is not None and self.forked.forking:
            self.forked.record(entry)
        elif self.item is None:
            self.outside.append(entry)
        else:
            self.item_entries.append(entry)
            self.pending.append(entry)

    def after_fork_in_parent(self) -> None:
        ident = _thread.get_ident()
        entry = self.awaiting.pop(ident, None)
        if entry is None:
            return
        judged = _fork.judged_by_wrapper(ident, entry.report)
        if judged is entry.report:  # not a stale entry of a fork that was stopped
            entry.forked = True

    def after_fork_in_child(self) -> None:
        self.awaiting.clear()
        if self.forked is not None:
            self.forked.after_fork_in_child()

    # --- pytest's side ------------------------------------------------------------------

    def note_origins(self, before: dict[str, str | None], where: str) -> None:
        # A pool registered meanwhile (its library imported by this fixture) is new here too.
        for pool_id, new in _first_uses().items():
            if new is not None and before.get(pool_id) is None:
                self.origins.setdefault(pool_id, where)

    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item) -> Generator[None, None, None]:
        self.item = item
        self.item_entries = []
        self.pending = []
        try:
            yield
        finally:
            self.outside.extend(self.pending)
            self.pending = []
            self.item = None

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
        mode = item.stash.get(_ITEM_MODE, self.mode)
        if mode != "off":
            self.annotate(outcome.get_result(), entries, mode)

    def annotate(self, rep: pytest.TestReport, entries: list[_Entry], mode: str) -> None:
        """Put the reports on the phase's report, and fail it in mode 'fail'."""
        text = render(entries, mode, self.origins)
        # Plain attributes travel with the report to pytest-forked's parent and xdist's
        # controller, which count them for the summary.
        rep.tokguard_forks = len(entries)  # type: ignore[attr-defined]
        rep.tokguard_repaired = sum(e.repaired for e in entries)  # type: ignore[attr-defined]
        rep.tokguard_refused = sum(e.report.refused for e in entries)  # type: ignore[attr-defined]
        if mode == "fail" and rep.passed:
            rep.outcome = "failed"
            rep.longrepr = text
        else:
            # A test that failed anyway, or mode warn/raise: the report goes with it.
            rep.sections.append((f"tokguard: unsafe fork during {rep.when}", text))

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        forks = getattr(report, "tokguard_forks", 0)
        if forks:
            self.forks += forks
            self.tests.add(report.nodeid)
            self.repaired += getattr(report, "tokguard_repaired", 0)
            self.refused += getattr(report, "tokguard_refused", 0)

    @pytest.hookimpl
    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        runner = self.forked.entries if self.forked is not None else []
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
            terminalreporter.write_line(render(outside, None, self.origins))
        terminalreporter.write_sep("=", line, yellow=True, bold=True)

    def close(self) -> None:
        self.unsubscribe()
        if self.forked is not None:
            self.forked.close()
        if self.previous_mode is not None:
            _config.set_mode(self.previous_mode)


FORKED_REPORTS_HELP = (
    "convert test reports for pytest-forked where it cannot serialise them itself "
    "(pytest-forked 1.7.5 with pytest 9.2: every forked test fails with 'EXITED with "
    "status 3'); default true; false leaves pytest-forked as it is."
)


_KEY = pytest.StashKey[TokguardPlugin]()
_MASTER_BEGAN = pytest.StashKey[bool]()  # this session made the process a master (--forked)
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

        began = _master.reason is None
        _master.recognised(_master.PYTEST_FORKED)
        if began and _master.reason == _master.PYTEST_FORKED:
            config.stash[_MASTER_BEGAN] = True
    except Exception as exc:
        _report.internal_error("the pytest plugin's master-mode check", exc)


def _end_master_mode(config: pytest.Config) -> None:
    """End the master mode that this session began, giving the process its settings back.

    A session run inside another process (pytester's in-process runs, as plugin test
    suites do) would otherwise leave that process a master after it ended: its
    ``TOKENIZERS_PARALLELISM`` overwritten, its torch at one thread.
    """
    if not config.stash.get(_MASTER_BEGAN, False):
        return
    try:
        from . import _master

        if _master.reason == _master.PYTEST_FORKED:
            _master._end()
    except Exception as exc:
        _report.internal_error("the pytest plugin's end of master mode", exc)


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
    plugin = TokguardPlugin(config, mode)
    if source in ("ini", "cli"):
        # TOKGUARD_MODE was applied by the library at import; code that called
        # tokguard.configure() since is only overridden by an explicit pytest setting.
        plugin.previous_mode = _config.mode
        _config.set_mode(CORE_MODE[mode])
    config.stash[_KEY] = plugin
    config.pluginmanager.register(plugin, "tokguard-session")
    # pytest-forked registers as "pytest_forked" (entry point name); -p no:forked blocks both.
    if any(config.pluginmanager.hasplugin(name) for name in ("pytest_forked", "forked")):
        from ._pytest_forked import PytestForked

        plugin.forked = PytestForked(plugin, config)
        config.pluginmanager.register(plugin.forked, "tokguard-forked")
    plugin.outer = _active  # an in-process pytester session nests inside another
    _active = plugin
    if not _hooks_registered:
        _hooks_registered = True
        _fork.at_fork("pytest", after_in_parent=_after_in_parent, after_in_child=_after_in_child)


def pytest_unconfigure(config: pytest.Config) -> None:
    global _active
    _end_master_mode(config)
    plugin = config.stash.get(_KEY, None)
    if plugin is None:
        return
    plugin.close()
    if _active is plugin:
        _active = plugin.outer


@pytest.fixture
def tokguard_reports(request: pytest.FixtureRequest) -> TokguardReports:
    """The unsafe forks recorded during this test; ``.assert_none()`` fails if there are any."""
    plugin = request.config.stash[_KEY]
    return TokguardReports(plugin, request.node.stash.get(_ITEM_MODE, plugin.mode))
