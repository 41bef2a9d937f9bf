"""Every probe of the reliability issue works or is refused by one lowbit line (``probes.py``)."""

import pytest

from tests.reliability.probes import PROBES, run


@pytest.mark.parametrize("probe", PROBES, ids=[p.name for p in PROBES])
def test_probe_works_or_is_refused_in_one_line(probe):
    outcome = run(probe)
    assert outcome.startswith(("refused: ", "exit 2: lowbit", "works: ", "warns: ")), outcome
