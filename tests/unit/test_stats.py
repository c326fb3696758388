from colocore.tools.stats import percentile


def test_percentile():
    assert percentile([], 50) == 0.0
    assert percentile([5], 99) == 5
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile(list(range(101)), 90) == 90
    assert percentile([3, 1, 2], 50) == 2            # unsorted input is fine
