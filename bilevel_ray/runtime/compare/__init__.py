"""``br.compare``: every method under one budget, ranked and recommended (driver, trial, plan,
progress, ranking, verdict, outcome, output files, picture)."""
