"""Copy the shared plumbing block from dcgan.py (the source copy) into the other seven scripts.

    python tests/sync_plumbing.py            # rewrite the copies that differ, name them
    python tests/sync_plumbing.py --check    # change nothing; exit 1, naming the copies that differ

The block runs from the line that starts with START to the line that starts with END, both
included. Each script keeps it so that the file runs alone (pasted into a notebook); this command
keeps the eight copies identical, so that a fix is made once (the pattern of transformers'
utils/check_copies.py).
"""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCE = "dcgan.py"
SCRIPTS = ["vanilla_gan.py", "dcgan.py", "cgan.py", "acgan.py", "wgan.py", "wgan_gp.py", "lsgan.py",
           "ebgan.py"]
START = "# %% Plumbing shared by every script"
END = "# %% End of the shared plumbing"
COMMAND = "python tests/sync_plumbing.py"


def split(text, name):
    """(before, block, after) of a script's text; the block includes both marker lines."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.startswith(START)]
    ends = [i for i, line in enumerate(lines) if line.startswith(END)]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise SystemExit(f"{name}: needs exactly one line starting with {START!r} and, after "
                         f"it, one starting with {END!r}")
    s, e = starts[0], ends[0] + 1
    return "".join(lines[:s]), "".join(lines[s:e]), "".join(lines[e:])


def stale_copies():
    """{script: the text it should have} for every copy that differs from the source."""
    block = split((REPO / SOURCE).read_text(), SOURCE)[1]
    stale = {}
    for name in SCRIPTS:
        text = (REPO / name).read_text()
        before, copy, after = split(text, name)
        if copy != block:
            stale[name] = before + block + after
    return stale


def main(argv):
    stale = stale_copies()
    if "--check" in argv:
        if stale:
            print(f"the plumbing differs from {SOURCE} in: {', '.join(stale)}; run: {COMMAND}")
            return 1
        return 0
    for name, text in stale.items():
        (REPO / name).write_text(text)
        print(f"{name}: plumbing copied from {SOURCE}")
    if not stale:
        print(f"all {len(SCRIPTS)} scripts hold the plumbing of {SOURCE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
