"""Ray Train: ``br.train``'s driver, the worker loop, the worker group, the data-parallel
collectives and the flatness judge actor. Never imports the Tune room."""
