"""runtime/save_interval.py: the Young/Daly interval and ``run.save_every: auto``."""
from __future__ import annotations

import math

import pytest

from beit3.runtime import save_interval as si


def test_young_daly_is_sqrt_two_c_m():
    assert si.young_daly_interval(30.0, 3600.0 * 10) == pytest.approx(math.sqrt(2 * 30 * 36000))
    assert si.young_daly_interval(0.0, 100.0) == 0.0
    with pytest.raises(ValueError):
        si.young_daly_interval(1.0, 0.0)


def test_interval_minimizes_the_expected_loss():
    c, m = 20.0, 50 * 3600.0
    best = si.young_daly_interval(c, m)
    at = lambda t: si.expected_loss_fraction(t, c, m)  # noqa: E731
    assert at(best) < at(0.8 * best) and at(best) < at(1.25 * best)
    assert at(best) == pytest.approx(math.sqrt(2 * c / m))  # C/T + T/2M at T = sqrt(2CM)


def test_llama3_anchor_scales_with_gpus():
    rate = 419 / (54 * 24 * 16384)
    assert si.failures_per_gpu_hour() == pytest.approx(rate)
    assert si.job_mtbf_hours(16384) == pytest.approx(54 * 24 / 419)  # ~3.1 h on the Llama 3 cluster
    assert si.job_mtbf_hours(64) == pytest.approx(256 * si.job_mtbf_hours(16384))
    with pytest.raises(ValueError):
        si.job_mtbf_hours(0)


def test_auto_interval_from_the_first_save():
    auto = si.AutoSaveInterval(mtbf_hours=10.0, first_save_step=5)
    assert [s for s in range(1, 8) if auto.due(s)] == [5, 6, 7]  # until measured: the first save is due
    line = auto.record(save_s=18.0, step_s=2.0, step=5)
    assert auto.interval_s == pytest.approx(math.sqrt(2 * 18 * 36000))  # 1138.4 s
    assert auto.steps == round(auto.interval_s / 2.0) == 569
    assert [s for s in range(1, 2000) if auto.due(s)] == [5 + 569, 5 + 2 * 569, 5 + 3 * 569]
    assert "save_every=auto: 569 steps" in line and "10.0 h MTBF" in line and "18.00 s save" in line


def test_auto_interval_bounds_and_defaults():
    auto = si.AutoSaveInterval(mtbf_hours=1.0, min_steps=10)
    auto.record(save_s=0.001, step_s=5.0)
    assert auto.steps == 10 and auto.anchor == auto.first_save_step
    capped = si.AutoSaveInterval(mtbf_hours=1000.0, max_steps=50)
    capped.record(save_s=100.0, step_s=0.1)
    assert capped.steps == 50
    default = si.AutoSaveInterval.for_gpus(64)
    assert default.mtbf_hours == pytest.approx(si.job_mtbf_hours(64))
    assert si.AutoSaveInterval.for_gpus(64, mtbf_hours=3.0).mtbf_hours == 3.0
    with pytest.raises(ValueError):
        si.AutoSaveInterval(mtbf_hours=0.0)
    with pytest.raises(ValueError):
        auto.record(save_s=1.0, step_s=0.0)
