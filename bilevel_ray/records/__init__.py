"""Records of results: the manifest beside every result (``manifest.json``: which code, data,
settings and seed produced it, and a hash of what it produced), the fingerprint of a problem's
data, the check a continuation must pass, and ``show``'s one-screen view.

This floor imports no Ray, no runtime and no command line (any room may use it); nothing is
imported here, so that the command line can name the invocation before it loads torch.

* :mod:`~bilevel_ray.records.manifest`: the schema, writing (atomically), reading, verifying;
* :mod:`~bilevel_ray.records.seal`: the seal that tells a record this account wrote;
* :mod:`~bilevel_ray.records.folder_check`: a result's folder checked before a command reads it;
* :mod:`~bilevel_ray.records.environment`: the code's identity, the libraries, the device;
* :mod:`~bilevel_ray.records.fingerprint`: the data's fingerprint (:mod:`~bilevel_ray.records.
  files`: files hashed);
* :mod:`~bilevel_ray.records.invocation`: the command line or API call;
* :mod:`~bilevel_ray.records.run_record`: a run's manifest and outcome;
* :mod:`~bilevel_ray.records.recorder`: a manifest through a result's life;
* :mod:`~bilevel_ray.records.continuation`: honest continuation;
* :mod:`~bilevel_ray.records.replay`: what ``rerun`` replays, and comparing parameters;
* :mod:`~bilevel_ray.records.show`: a manifest on one screen.
"""
