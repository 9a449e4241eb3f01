"""Ray Tune: ``br.tune``'s sweep (driver, trial, search space and strategy, population-based
training, lineages and schedules, the pre-flight, the sweep's folder and outcome)."""
