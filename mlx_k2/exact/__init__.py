"""Float64 functions whose results are the same bits on every machine (exp, log, sin, cos, pow, exact sums)."""
