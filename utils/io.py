"""Atomic file writes: results and checkpoints are written to a temporary file in the
target folder, flushed to disk and renamed over the target, so an interrupted run never
leaves a truncated file and readers never see a half-written one."""
import json
import os
import tempfile


def atomic_write(path, write, mode='wb'):
    """Call ``write(file)`` on a temporary file next to ``path``, then rename it to ``path``.

    Creates the parent folder. On any error (or interrupt) the temporary file is removed and
    an existing ``path`` is left untouched.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp',
                               dir=folder)
    try:
        with os.fdopen(fd, mode, **({'newline': ''} if 'b' not in mode else {})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp files are private (0600); give the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path, text):
    atomic_write(path, lambda f: f.write(text), mode='w')


def atomic_write_json(path, obj, indent=1):
    atomic_write_text(path, json.dumps(obj, indent=indent) + '\n')
