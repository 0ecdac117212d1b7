"""Output files that appear whole or not at all: written under temporary names beside their final
paths, renamed into place once everything is written (dsv3.quantize, dsv3.evaluate --expert-load,
training's resumable state).
An error before that leaves the final paths as they were."""

import contextlib
import errno
import os


class Staged:
    """Output files staged for their final paths. add(path) makes the empty temporary file to
    write and returns its name: making it is the check that `path` can be written, so add every
    output before the long work. commit() renames each over its final path (os.replace: a reader
    sees the old file or the new one, and a symlink there is replaced, not written through);
    discard() removes them. As a context manager: commit on success, discard on an exception."""

    def __init__(self):
        self.paths = {}  # final path -> temporary path

    def add(self, path) -> str:
        """Raises OSError where `path` cannot be written (no such folder, no permission, a folder)."""
        if os.path.isdir(path):
            raise IsADirectoryError(errno.EISDIR, "is a folder", path)
        folder, name = os.path.split(path)
        tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
        open(tmp, "wb").close()
        self.paths[path] = tmp
        return tmp

    def commit(self):
        for path, tmp in self.paths.items():
            os.replace(tmp, path)
        self.paths.clear()

    def discard(self):
        for tmp in self.paths.values():
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        self.paths.clear()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.commit()
        else:
            self.discard()
