"""Atomic file writes: results and checkpoints are written to a temporary file in the
target folder, flushed to disk and renamed over the target, so an interrupted run never
leaves a truncated file and readers never see a half-written one."""
import json
import os
import tempfile


def _process_umask():
    """The process umask, read without changing it where the OS allows (``os.umask`` can only
    be read by setting it, which races with files other threads create meanwhile)."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('Umask:'):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _UMASK_AT_IMPORT


def _read_umask_once():
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


_UMASK_AT_IMPORT = _read_umask_once()


def give_default_mode(path):
    """Give ``path`` the permissions a plain ``open(path, 'w')`` would have (0666 minus the
    umask). Temporary files from ``tempfile.mkstemp`` are private (0600); every file we write
    through a temporary file gets this before it is renamed into place."""
    os.chmod(path, 0o666 & ~_process_umask())


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
        give_default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path, text):
    atomic_write(path, lambda f: f.write(text), mode='w')


def atomic_write_json(path, obj, indent=1):
    atomic_write_text(path, json.dumps(obj, indent=indent) + '\n')


def file_sha256(path, chunk=1 << 20):
    """Hex SHA-256 of a file's contents, read in chunks."""
    import hashlib
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(chunk), b''):
            digest.update(block)
    return digest.hexdigest()
