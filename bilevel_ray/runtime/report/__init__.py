"""``bilevel-ray report DIR``: the runs of a folder as a table and a picture; a sweep's picture."""
