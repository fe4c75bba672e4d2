"""Pytest plugin: what a run covered, per marker, and in CI a run that cannot cover less than the whole suite.

Every run ends with a table of the tests collected, passed, failed, skipped and deselected per marker (``cluster``,
``e2e``, ``node``, ``slow``, and the unmarked ones), so a run that dropped a group shows it.

With ``FINETUNE_CI=1`` (``.ci/run`` sets it) the run is refused at once when something narrows it (``-k``, ``-m``,
``--deselect``, ``--ignore``, ``--ignore-glob``, test paths instead of the configured ``testpaths``, ``--lf``,
``--sw``) or when a test would run without the project's deadline (pytest-timeout missing, or an effective default
other than ``PROJECT_TIMEOUT``, from the command line, ``PYTEST_ADDOPTS``, ``PYTEST_TIMEOUT`` or an ini file alike,
or a ``timeout`` marker of 0); and it FAILS at the end when any test was skipped, xfailed, deselected or never run. The
settings are read from pytest's own configuration, not from the text that set them.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass, field

import pytest

CI_ENV = "FINETUNE_CI"
PROJECT_TIMEOUT = 300  # seconds, every test's default deadline: --timeout in pyproject.toml's addopts
MARKERS = ("cluster", "e2e", "node", "slow")
UNMARKED = "unmarked"
# Options that run fewer tests than the suite: (pytest's dest, the flag a user typed).
NARROWING = (("keyword", "-k"), ("markexpr", "-m"), ("deselect", "--deselect"), ("ignore", "--ignore"),
             ("ignore_glob", "--ignore-glob"), ("lf", "--lf"), ("stepwise", "--sw"),
             ("stepwise_skip", "--sw-skip"), ("collectonly", "--collect-only"), ("setuponly", "--setup-only"),
             ("setupplan", "--setup-plan"))
OUTCOMES = ("collected", "passed", "failed", "skipped", "deselected")
MARKERS_PROPERTY = "finetune-markers"  # a report's user property: the markers of its test
DESELECTED_OUTPUT = "finetune-deselected"  # what an xdist worker deselected, in the output it hands the controller


def ci_mode() -> bool:
    return os.environ.get(CI_ENV) == "1"


def _is_controller(config: pytest.Config) -> bool:
    """False in a pytest-xdist worker: the controller sees every report and prints the summary."""
    return not hasattr(config, "workerinput")


@dataclass
class Ledger:
    """Each test's markers and outcome, from the reports every run produces (with xdist too)."""

    markers: dict[str, tuple[str, ...]] = field(default_factory=dict)  # nodeid -> its markers of MARKERS
    outcome: dict[str, str] = field(default_factory=dict)  # nodeid -> passed, failed or skipped
    deselected: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def collect(self, nodeid: str, names: Iterable[str] | None) -> None:
        """A collected test, with its markers (None: not known yet, an xdist worker collected it)."""
        if names is None:
            self.markers.setdefault(nodeid, ())
            return
        present = set(names)
        self.markers[nodeid] = tuple(m for m in MARKERS if m in present) or (UNMARKED,)

    def record(self, report: pytest.TestReport) -> None:
        if not self.markers.get(report.nodeid):
            self.collect(report.nodeid, dict(report.user_properties).get(MARKERS_PROPERTY, ()))
        if report.failed:
            self.outcome[report.nodeid] = "failed"
        elif report.skipped or hasattr(report, "wasxfail"):
            self.outcome.setdefault(report.nodeid, "skipped")
        elif report.when == "call" and report.passed:
            self.outcome.setdefault(report.nodeid, "passed")

    def table(self) -> dict[str, Counter[str]]:
        rows: dict[str, Counter[str]] = {name: Counter() for name in (*MARKERS, UNMARKED, "all")}
        for nodeid, markers in self.markers.items():
            for row in (*(markers or (UNMARKED,)), "all"):
                rows[row]["collected"] += 1
                if nodeid in self.outcome:
                    rows[row][self.outcome[nodeid]] += 1
        for markers in self.deselected.values():
            for row in (*markers, "all"):
                rows[row]["deselected"] += 1
        return rows

    def not_run(self) -> list[str]:
        return [nodeid for nodeid in self.markers if nodeid not in self.outcome]

    def of(self, outcome: str) -> list[str]:
        return [nodeid for nodeid, seen in self.outcome.items() if seen == outcome]


def _marker_names(item: pytest.Item) -> Iterable[str]:
    return (m.name for m in item.iter_markers())


def refusals(config: pytest.Config) -> list[str]:
    """Why this configuration would run less than the whole suite, or a test without its deadline (CI mode)."""
    problems = [f"{flag} narrows the run" for dest, flag in NARROWING if config.getoption(dest, default=None)]
    if _is_controller(config) and config.args_source != pytest.Config.ArgsSource.TESTPATHS:
        problems.append(f"test paths given ({' '.join(config.args)}): CI runs the configured testpaths "
                        f"({' '.join(config.getini('testpaths'))})")
    timeout_plugin = config.pluginmanager.get_plugin("timeout")
    if timeout_plugin is None:
        problems.append("pytest-timeout is not active (installed? -p no:timeout?): tests would run without a deadline")
    else:
        effective = timeout_plugin.get_env_settings(config).timeout
        if effective != PROJECT_TIMEOUT:
            problems.append(f"the effective default timeout is {effective!r} s, not the project's {PROJECT_TIMEOUT} s "
                            "(--timeout, PYTEST_TIMEOUT or an ini file changed it)")
    return problems


def pytest_configure(config: pytest.Config) -> None:
    if ci_mode() and (problems := refusals(config)):
        raise pytest.UsageError(f"{CI_ENV}=1: CI runs the whole suite with the project's deadlines; refused:\n  - "
                                + "\n  - ".join(problems))
    config.pluginmanager.register(SuiteGuard(config), "finetune-suite-guard")


class SuiteGuard:
    """Keeps the ledger of one session, prints it, and in CI fails a run that left a test out."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.ledger = Ledger()

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        """After every other plugin marked and selected: the markers of what will run, and in CI no test without a
        deadline (a ``timeout(0)`` marker switches it off)."""
        for item in items:
            self.ledger.collect(item.nodeid, _marker_names(item))
        undeadlined = [item.nodeid for item in items
                       if (marker := item.get_closest_marker("timeout")) is not None and marker.args
                       and not marker.args[0]]
        if ci_mode() and undeadlined:
            raise pytest.UsageError(f"{CI_ENV}=1: these tests have no deadline (timeout marker 0): "
                                    + ", ".join(undeadlined))

    def pytest_deselected(self, items: Sequence[pytest.Item]) -> None:
        for item in items:
            self.ledger.deselected[item.nodeid] = tuple(m for m in MARKERS if item.get_closest_marker(m)) or (
                UNMARKED,)
        if not _is_controller(self.config):  # an xdist worker: its ledger goes to the controller when it ends
            self.config.workeroutput[DESELECTED_OUTPUT] = self.ledger.deselected  # type: ignore[attr-defined]

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: object, error: object) -> None:
        """xdist: what a worker deselected (every worker collects, and deselects, the same tests)."""
        self.ledger.deselected.update(getattr(node, "workeroutput", {}).get(DESELECTED_OUTPUT, {}))

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node: object, ids: Sequence[str]) -> None:
        """xdist: what a worker collected (the controller collects nothing itself), so that a test no worker ran
        still counts as never run; its markers come with its reports."""
        for nodeid in ids:
            self.ledger.collect(nodeid, None)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[
            None, pytest.TestReport, pytest.TestReport]:
        """The test's markers travel with its report (from an xdist worker too; a report's keywords would also hold
        the names of its folders, and tests/node is not the ``node`` marker)."""
        report = yield
        report.user_properties.append((MARKERS_PROPERTY, tuple(m.name for m in item.iter_markers())))
        return report

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.ledger.record(report)

    def problems(self) -> list[str]:
        """What this run left out (CI mode fails it for any)."""
        problems = []
        for what, nodeids in (("skipped or xfailed", self.ledger.of("skipped")),
                              ("deselected", list(self.ledger.deselected)), ("never run", self.ledger.not_run())):
            if nodeids:
                shown = "\n      ".join(nodeids[:20])
                more = f"\n      ... and {len(nodeids) - 20} more" if len(nodeids) > 20 else ""
                problems.append(f"{len(nodeids)} test(s) {what}:\n      {shown}{more}")
        return problems

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        """In CI, a run that skipped, deselected or did not run a test fails, whatever else it did."""
        if ci_mode() and _is_controller(self.config) and exitstatus == pytest.ExitCode.OK and self.problems():
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not _is_controller(self.config):
            return
        rows = self.ledger.table()
        terminalreporter.section("tests by marker")
        width = max(len(name) for name in rows)
        terminalreporter.write_line(" ".join([f"{'marker':<{width}}", *(f"{o:>10}" for o in OUTCOMES)]))
        for name, counts in rows.items():
            if counts["collected"] or counts["deselected"]:
                terminalreporter.write_line(" ".join([f"{name:<{width}}", *(f"{counts[o]:>10}" for o in OUTCOMES)]))
        if ci_mode() and (problems := self.problems()):
            terminalreporter.section(f"{CI_ENV}=1: FAILED, the run did not cover the whole suite", red=True)
            for problem in problems:
                terminalreporter.write_line(f"  - {problem}", red=True)
