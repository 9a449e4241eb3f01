"""Reaching Ray: connecting to a cluster (or starting a local Ray) quietly, and running one
function there as a task (``--address``)."""
