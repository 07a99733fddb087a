"""Plots: interval bars whose interval does not contain the value (a percentile bootstrap CI of ECE can do that)."""

import matplotlib.image as mpimg

from lmrefinery.plots import bar_panels


def test_bar_panels_draw_an_interval_that_lies_above_its_value(tmp_path):
    # the values of the evidence run's `first` student: ECE 0.0121, bootstrap CI [0.0123, 0.0125]
    path = bar_panels(tmp_path / "bars.png", ["sft", "first"],
                      {"ECE": [(0.079, 0.036, 0.116), (0.0121, 0.0123, 0.0125)]}, "intervals")
    assert mpimg.imread(path).shape[2] in (3, 4)
