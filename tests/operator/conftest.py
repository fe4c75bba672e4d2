"""Fixtures for running the REAL operator against the test cluster.

The process is started once per module and restarted by tests that kill it; every process started here is stopped
at teardown, so the suite leaves no operator behind.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.controlplane.cluster import ControlPlane
from tests.operator.cluster_support import OperatorProcess


@pytest.fixture(scope="module")
def operator_process(control_plane: ControlPlane, finetune_crd: None,
                     tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    with OperatorProcess(control_plane, tmp_path_factory.mktemp("operator")) as op:
        yield op


@pytest.fixture
def operator(operator_process: OperatorProcess) -> OperatorProcess:
    """The module's operator, running (a previous test may have stopped or killed it)."""
    if not operator_process.alive:
        operator_process.start()
    return operator_process
