"""A golden loss curve: a short fixed demo run must reproduce the stored losses.

Any silent numerical change (sampling, decoding, augmentation, batching, the model, the losses,
the optimizer) moves the curve; thread-count noise does not: between 1, 2 and 4 threads, and
between the AVX-512, AVX2 and plain CPU kernels, the curves differed by at most 1.4e-6 relative,
70 times below the tolerance (1e-4).

When a change is MEANT to move the numbers, regenerate the file and commit it with the change:

    python tests/make_golden.py

(tests/make_golden.py says what it runs; the file records the command, versions and noise).
"""
import json

import numpy as np

import make_golden


def test_demo_loss_curve_matches_the_golden_file(demo_root):
    golden = json.loads(make_golden.GOLDEN.read_text())
    got = make_golden.run_curve(demo_root, demo_root / "runs" / "golden", threads=1)
    assert set(golden["losses"]) == set(make_golden.KEYS)
    hint = (f"; if this change is meant to move the losses, run `python tests/make_golden.py` "
            f"and commit tests/golden/ (the file was made with {golden['versions']})")
    for key in make_golden.KEYS:
        want = np.array(golden["losses"][key])
        assert len(want) == make_golden.STEPS
        np.testing.assert_allclose(got[key], want, rtol=golden["rtol"], atol=golden["atol"],
                                   err_msg=key + hint)
