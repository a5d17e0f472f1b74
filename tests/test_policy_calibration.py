from __future__ import annotations

import pytest

from autellix.policy.calibration import ServiceCalibrator
from autellix.policy.mlfq import MultiLevelQueues


def test_first_boundary_is_the_low_percentile_and_boundaries_double() -> None:
    cal = ServiceCalibrator(percentile=25.0, min_samples=4)
    assert cal.boundaries(4) is None
    for s in [4.0, 1.0, 3.0, 2.0, 8.0, 5.0, 7.0, 6.0]:
        cal.observe(s)
    assert cal.first_boundary() == 2.0
    assert cal.boundaries(4) == (2.0, 4.0, 8.0)


def test_window_forgets_old_samples() -> None:
    cal = ServiceCalibrator(percentile=50.0, window=3, min_samples=1)
    for s in [100.0, 100.0, 100.0, 1.0, 1.0, 1.0]:
        cal.observe(s)
    assert cal.first_boundary() == 1.0


def test_calibrated_queues_are_not_inert() -> None:
    """With boundaries from the service distribution, programs spread over several levels."""
    cal = ServiceCalibrator(min_samples=10)
    services = [0.5 * (1 + i % 20) for i in range(200)]
    for s in services:
        cal.observe(s)
    q = MultiLevelQueues()
    bounds = cal.boundaries(q.config.num_levels)
    assert bounds is not None
    q.set_boundaries(bounds)
    attained = [sum(services[:k]) for k in range(0, 60, 3)]
    assert len({q.level_for(a) for a in attained}) >= 5


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        ServiceCalibrator(percentile=0)
    with pytest.raises(ValueError):
        ServiceCalibrator().observe(-1.0)
