"""Bad-input refusals, one file per input class.

``test_paths`` (output folders, files, links, names), ``test_numbers`` (sizes, step sizes, counts,
seeds, schedules), ``test_settings`` (names and choices: methods, optimizers, unknown keys,
options of another method, problem settings, run settings), ``test_user_code`` (factories,
problems and losses that misbehave), ``test_files`` (checkpoints, weights files, settings and
schedules read back, result files), ``test_data`` (data, batches, x0 / y0 tensors) and
``test_cli`` (command-line usage errors). ``test_whole_catalogue`` checks the cases of every
class together and writes them as one Markdown table.

Shared helpers: :mod:`.support` (tiny valid calls to vary) and :mod:`.catalogue` (the ``Case``
table format, its runner and checks, and the setups several classes use); ``conftest.py`` holds
the fixtures that keep every case away from Ray.
"""
