"""The loss-curve guard (``tests/loss_curve.py``): a short deterministic 2-rank ZeRO-3 run must stay
inside the committed reference band, and a deliberately broken objective must leave it.

After an intended numerical change, regenerate the reference with one command:
``OMP_NUM_THREADS=1 .venv/bin/python -m tests.loss_curve --write``.
"""
import pytest

from tests.loss_curve import REGENERATE, STEPS, load_reference, outside_band, read_curve, run_curve


@pytest.fixture(scope="module")
def reference():
    ref = load_reference()
    assert ref["steps"] == STEPS, f"reference has {ref['steps']} steps, the guard runs {STEPS}: {REGENERATE}"
    return ref


@pytest.mark.distributed
def test_loss_curve_stays_inside_the_reference_band(reference_run, reference):
    curve = read_curve(reference_run)  # the session's reference run is the guard's run
    bad = outside_band(curve, reference)
    assert not bad, ("the loss curve left the reference band (if the change is intended, regenerate: "
                     f"{REGENERATE}):\n" + "\n".join(bad))


@pytest.mark.distributed
def test_guard_fails_on_a_broken_objective(demo_data, tiny_tokenizer, reference, tmp_path):
    curve = run_curve(demo_data, tiny_tokenizer, tmp_path, broken=True)
    bad = outside_band(curve, reference)
    # MLM labels shifted by one position: the MLM (and so the total) curve leaves the band
    assert any(b.startswith("mlm_loss") for b in bad), "the guard did not notice MLM labels shifted by one"
    assert len(bad) >= STEPS // 2, bad
