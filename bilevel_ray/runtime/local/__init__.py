"""The in-process run (no Ray): the step loop and its run settings, the history, the checkpoint
format and output files, the flatness watch, torch's threads, a named problem's diagnosis."""
