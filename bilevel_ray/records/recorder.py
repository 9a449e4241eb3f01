"""A result's manifest through its life: written when the work starts (outcome ``running``, so
that an interrupted run still has a record to continue from), and again when it ends, with the
outcome and the outputs' hashes; a run that diverges or fails is recorded so before the error
goes on. A refusal (a ``ConfigError``: bad input found as the work starts) leaves the record as
it was."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from bilevel_ray.atomic_files import atomic_text
from bilevel_ray.errors import ConfigError, DivergenceError
from bilevel_ray.records.manifest import MANIFEST, finish, write_manifest

__all__ = ["Recorder"]


class Recorder:
    """The manifest of the result in ``folder``; ``outputs`` are its output files (relative
    paths; those that exist at the end are hashed)."""

    def __init__(self, folder: Path, manifest: dict[str, Any], outputs: Iterable[str]):
        self.folder, self.manifest, self.outputs = Path(folder), manifest, list(outputs)
        self.before: str | None = None

    def start(self) -> Recorder:
        path = self.folder / MANIFEST
        self.before = path.read_text() if path.is_file() else None
        write_manifest(self.folder, self.manifest)
        return self

    def _withdraw(self) -> None:
        """A refusal (ConfigError) changes no record: the manifest as it was before."""
        path = self.folder / MANIFEST
        if self.before is None:
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # left empty by the refusal: as it was, absent
                if not any(self.folder.iterdir()):
                    self.folder.rmdir()
        else:
            text = self.before
            atomic_text(path, text)

    @contextlib.contextmanager
    def running(
        self, diverged: Callable[[DivergenceError], Mapping[str, Any]] | None = None
    ) -> Iterator[Recorder]:
        """The work: a divergence or another error ends the record (``diverged`` / ``failed``,
        or ``interrupted``) before it propagates."""
        try:
            yield self
        except DivergenceError as err:
            outcome = diverged(err) if diverged else {"status": "diverged", "step": err.step}
            self.end(outcome)
            raise
        except ConfigError:
            self._withdraw()
            raise
        except KeyboardInterrupt:
            self.end({"status": "interrupted"})
            raise
        except Exception as err:
            first = str(err).strip().splitlines()
            self.end(
                {"status": "failed", "reason": f"{type(err).__name__}: {first[0] if first else ''}"}
            )
            raise

    def end(self, outcome: Mapping[str, Any], outputs: Iterable[str] = ()) -> dict[str, Any]:
        return finish(self.manifest, self.folder, outcome, [*self.outputs, *outputs])
