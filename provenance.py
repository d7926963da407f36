"""What each stage of run.sh read and wrote, so that ``RESUME=1`` redoes exactly what changed.

    python provenance.py begin  STAGE --dir OUT/.stages --in FILE... --out FILE... -- COMMAND...
    python provenance.py record STAGE --dir OUT/.stages --seconds N
    python provenance.py check  STAGE --dir OUT/.stages --in FILE... --out FILE... -- COMMAND...

``begin``, before the stage runs: its record and its previous output files are removed
(folders are left to the stage, which rewrites them whole), and ``STAGE.pending`` keeps the
command, the fingerprints of its inputs and the list of its outputs. ``record``, once it
finished: the fingerprints of the outputs are added and the pending record becomes
``STAGE``. ``check`` exits 0, printing the recorded seconds, when ``STAGE`` holds this
command, these inputs with the same fingerprints and these outputs with the same
fingerprints; otherwise it prints the first difference and exits 1.

A fingerprint (``fingerprint``) is fast rather than full: a file's size, its mtime_ns and
the sha256 of its first and last 4 MiB (the whole file below 8 MiB), so a file rewritten in
place counts as changed even at the same size; a folder's is the sha256 of the relative
path, size and mtime_ns of every file under it (a stat each, no reading); a missing path's
is null. Paths are followed through symbolic links: a data root re-pointed is other files.
"""
import argparse
import hashlib
import json
import os
import sys

from utils import atomic_json

ENDS = 4 << 20  # bytes hashed at each end of a file


def content(path):
    """{"size", "sha256" of the first and last ENDS bytes (all of a smaller file)}: what a
    file holds, whenever or wherever it was written."""
    size = os.path.getsize(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= 2 * ENDS:
            h.update(f.read())
        else:
            h.update(f.read(ENDS))
            f.seek(size - ENDS)
            h.update(f.read(ENDS))
    return {"size": size, "sha256": h.hexdigest()}


def folder_digest(path):
    """sha256 of (relative path, size, mtime_ns) of every file under ``path``."""
    h = hashlib.sha256()
    for d, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            full = os.path.join(d, name)
            st = os.stat(full)
            h.update(("%s\t%d\t%d\n" % (os.path.relpath(full, path), st.st_size,
                                        st.st_mtime_ns)).encode())
    return h.hexdigest()


def fingerprint(path):
    """A file: ``content`` and mtime_ns; a folder: {"folder": ``folder_digest``}; None when
    the path does not exist."""
    if not os.path.exists(path):
        return None
    if os.path.isdir(path):
        return {"folder": folder_digest(path)}
    return {**content(path), "mtime_ns": os.stat(path).st_mtime_ns}


def fingerprints(paths):
    return {p: fingerprint(p) for p in paths}


def difference(kind, want, have):
    """The first path whose fingerprint differs -> "input X changed" etc., or None."""
    if list(want) != list(have):
        return "its %ss are other files" % kind
    for path, fp in have.items():
        if fp != want[path]:
            state = "is missing" if fp is None else "appeared" if want[path] is None \
                else "changed"
            return "%s %s %s" % (kind, path, state)
    return None


def read(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except ValueError:  # a record of an older run.sh (plain text) or a torn one
        return {}


def check(record, command, inputs, outputs):
    """-> (None, seconds) when the record matches, else (why it must run again, None)."""
    if record is None:
        return "no record of a finished run", None
    if record.get("command") != command:
        return "another command (or a record of an older run.sh)", None
    why = difference("input", record["inputs"], fingerprints(inputs)) \
        or difference("output", record["outputs"], fingerprints(outputs))
    return (why, None) if why else (None, record["seconds"])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("action", choices=["begin", "record", "check"])
    p.add_argument("stage")
    p.add_argument("--dir", required=True, help="where the records are (OUT/.stages)")
    p.add_argument("--in", dest="inputs", nargs="*", default=[], help="what the stage reads")
    p.add_argument("--out", dest="outputs", nargs="*", default=[],
                   help="what it writes (files or folders)")
    p.add_argument("--seconds", type=int, help="record: the stage's wall time")
    a = p.parse_args(argv[:len(argv) - len(command) - 1] if command else argv)
    done = os.path.join(a.dir, a.stage)
    if a.action == "check":
        why, seconds = check(read(done), command, a.inputs, a.outputs)
        print(why or seconds)
        return 1 if why else 0
    if a.action == "begin":
        for path in [done] + a.outputs:
            if os.path.isfile(path):
                os.remove(path)
        os.makedirs(a.dir, exist_ok=True)
        atomic_json({"command": command, "inputs": fingerprints(a.inputs),
                     "outputs": a.outputs}, done + ".pending")
        return 0
    record = read(done + ".pending")
    record.update(outputs=fingerprints(record["outputs"]), seconds=a.seconds)
    atomic_json(record, done)
    os.remove(done + ".pending")
    return 0


if __name__ == "__main__":
    sys.exit(main())
