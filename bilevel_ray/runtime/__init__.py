"""Runtimes, one room each: ``local`` (the in-process run, no Ray), ``cluster`` (reaching Ray),
``train`` (Ray Train), ``tune`` (Ray Tune), ``compare`` and ``report``. Nothing is imported
here: a room loads when it is used (the command line reads the run settings' declarations,
:mod:`bilevel_ray.runtime.local.run_spec`, without torch)."""
