"""Summary figures shared by the benchmarks and the console."""


def percentile(values, q):
    """Linear interpolation between closest ranks (numpy's default); q in 0..100."""
    v = sorted(values)
    if not v:
        return 0.0
    pos = (len(v) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)
