"""Run the ``resprune`` command line and SIGKILL it in the middle of a chosen write.

Used by the kill-and-resume tests: a real process, really killed, at a point chosen
exactly (not by timing)::

    python tests/kill_at.py append - 2 -- sweep --out DIR ...        # half-way through the 2nd example line
    python tests/kill_at.py replace summary.json 1 -- sweep ...     # while the 1st summary.json is written
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import resprune.runfiles as runfiles


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    mode, name, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
    args = sys.argv[sys.argv.index("--") + 1:]
    seen = 0

    if mode == "append":  # the process dies with half a line on disk
        append = runfiles.append_jsonl

        def killing_append(path, record):
            nonlocal seen
            seen += 1
            if seen == nth:
                line = json.dumps(record).encode()
                with open(path, "ab") as fh:
                    fh.write(line[: len(line) // 2])
                    fh.flush()
                    os.fsync(fh.fileno())
                _die()
            append(path, record)

        runfiles.append_jsonl = killing_append
    elif mode == "replace":  # the process dies with a half-written temporary file, before the rename
        replace = runfiles.replace_with

        def killing_replace(path, write):
            nonlocal seen
            if Path(path).name == name:
                seen += 1
                if seen == nth:
                    tmp = runfiles._temp_for(Path(path))
                    write(tmp)
                    with open(tmp, "rb+") as fh:
                        fh.truncate(max(tmp.stat().st_size // 2, 1))
                    _die()
            return replace(path, write)

        runfiles.replace_with = killing_replace
    else:
        raise SystemExit(f"unknown mode {mode!r}")

    from resprune.cli import main as cli

    return cli(args)


if __name__ == "__main__":
    sys.exit(main())
