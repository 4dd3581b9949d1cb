"""Fake flash tools for the flash tests: small /bin/sh scripts put first on PATH.

Only where the real tool cannot run here: em100 and dpcmd are not packaged for
Debian and need their USB hardware, and the streaming and cancellation tests
need a tool that waits on the test.  Real flashing is tested with flashrom's
``dummy`` programmer.
"""

from __future__ import annotations

from pathlib import Path

#: Records its arguments one per line in $FAKE_DIR/argv, copies the file after -d
#: (em100's image) to $FAKE_DIR/image, prints a line and exits with $FAKE_EXIT.
RECORDER = """\
out="$FAKE_DIR/argv"
: > "$out"
prev=""
for a in "$@"; do
  printf '%s\\n' "$a" >> "$out"
  [ "$prev" = "-d" ] && cp "$a" "$FAKE_DIR/image"
  prev="$a"
done
echo "fake $(basename "$0") ran"
exit "${FAKE_EXIT:-0}"
"""

#: Prints a line, then waits (bounded) until the file $GO_FILE exists, then prints another.
WAITS_FOR_GO = """\
echo "first line"
i=0
while [ ! -e "$GO_FILE" ]; do
  i=$((i + 1))
  [ "$i" -gt 1000 ] && { echo "never released"; exit 3; }
  sleep 0.01
done
echo "second line"
"""

#: Records its pid, then runs until signalled; on SIGTERM it writes $FAKE_DIR/terminated.
RUNS_UNTIL_TERM = """\
trap 'echo terminated > "$FAKE_DIR/terminated"; exit 143' TERM
echo $$ > "$FAKE_DIR/pid"
echo started
while :; do sleep 0.02; done
"""

#: Like RUNS_UNTIL_TERM but ignores SIGTERM (only SIGKILL ends it).
IGNORES_TERM = """\
trap '' TERM
echo $$ > "$FAKE_DIR/pid"
echo started
while :; do sleep 0.02; done
"""


def install(bin_dir: Path, name: str, body: str) -> Path:
    """Write an executable /bin/sh script ``bin_dir/name`` and return its path."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path
