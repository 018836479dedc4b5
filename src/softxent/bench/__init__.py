"""``softxent bench``: softxent against what a user would pick instead, in one run.

Every contender is timed alternately with a baseline (a same-size memory copy
or read for the cross-entropy suite), so each row reports a ratio measured
under the same conditions, next to its absolute time, bandwidth, peak memory
and error against float64.  Missing peers are skipped with the reason.
"""
