"""End to end with nothing but a shell: mkdir, echo >, cat, rmdir, cp, getfattr, diff -r.

Imports a real source tree (a slice of the installed Python stdlib plus symlinks, hard links,
xattrs, odd names), branches it three ways, edits, commits two, discards one, prunes the base,
and compares every result with ``diff -r`` against expected trees built with the same edits in
plain directories.
"""

from __future__ import annotations

import pytest

from fusehelpers import make_source_tree, mounted, needs_fuse

pytestmark = needs_fuse

EDITS = r"""
# The same edits, applied to an expected tree in a plain directory and to a branch.
edit_a() {  # modify, add, delete, copy a directory
    echo "# edited by a" >> "$1/json/__init__.py"
    printf 'new file\n' > "$1/added a.txt"
    rm "$1/json/tool.py"
    cp -a "$1/json" "$1/json_copy"
}
edit_b() {  # a rename, a chmod, a new directory with a symlink, an xattr
    mv "$1/email" "$1/email2"
    chmod 600 "$1/json/decoder.py"
    mkdir -p "$1/deep/er/est"
    ln -s ../../json "$1/deep/er/link"
    setfattr -n user.note -v "from b" "$1/json/encoder.py"
}
edit_c() {
    rm -r "$1/json"
}
"""


@pytest.mark.parametrize("views", ["kernel", "fuse"])  # kernel: the daemon's default
def test_agent_loop_with_plain_shell(views):
    with mounted(views=views) as fs:
        make_source_tree(fs.base / "src")
        fs.sh(r"""
            src=$BASE/src
            # awkward cases: hard links, symlinks, xattrs, empty dir, names with spaces/UTF-8
            ln "$src/json/scanner.py" "$src/json/hardlink.py"
            ln -s json/decoder.py "$src/sym"
            ln -s /nonexistent/target "$src/dangling"
            mkdir "$src/empty dir"
            printf 'ünïcødé\n' > "$src/ünï cødé.txt"
            setfattr -n user.origin -v stdlib "$src/json"
            chmod 755 "$src/json/scanner.py"
            touch -d '2001-02-03 04:05:06' "$src/json/encoder.py"
        """)
        fs.sh(EDITS + r"""
            src=$BASE/src
            echo "import base $src kind=import" > "$MNT/ctl"
            test "$(getfattr --only-values -n user.cascowfs.label.kind "$MNT/snapshots/base")" = import
            diff -r --no-dereference "$src" "$MNT/snapshots/base"
            getfattr -n user.origin "$MNT/snapshots/base/json" | grep -q stdlib

            # branch three ways
            mkdir "$MNT/branches/a"
            echo base > "$MNT/branches/a/parent"
            echo "branch b base" > "$MNT/ctl"
            mkdir "$MNT/branches/c" && echo base > "$MNT/branches/c/parent"
            test "$(cat "$MNT/branches/b/parent")" = base
            for br in a b c; do diff -r --no-dereference "$src" "$MNT/branches/$br/tree/"; done

            # edit the branches and the expected trees alike
            for br in a b c; do
                cp -a "$src" "$BASE/exp-$br"
                edit_$br "$BASE/exp-$br"
                edit_$br "$(readlink "$MNT/branches/$br/tree")"
                diff -r --no-dereference "$BASE/exp-$br" "$MNT/branches/$br/tree/"
            done
            grep -qx 'A added a.txt' "$MNT/branches/a/status"
            grep -qx 'D json/tool.py' "$MNT/branches/a/status"
            grep -qx 'M json/__init__.py' "$MNT/branches/a/status"
            grep -qx 'D email' "$MNT/branches/b/status"
            grep -qx 'A email2' "$MNT/branches/b/status"

            # commit two (file and ctl), discard one (rmdir)
            echo snap-a > "$MNT/branches/a/commit"
            echo "commit b snap-b reward=0.5 plan='rename email'" > "$MNT/ctl"
            rmdir "$MNT/branches/c"
            test ! -e "$MNT/branches/c"
            test "$(cat "$MNT/branches/a/commit")" = snap-a
            test "$(cat "$MNT/branches/a/parent")" = snap-a
            test -z "$(cat "$MNT/branches/a/status")"
            test "$(getfattr --only-values -n user.cascowfs.parent "$MNT/snapshots/snap-b")" = base
            test "$(getfattr --only-values -n user.cascowfs.label.plan "$MNT/snapshots/snap-b")" = "rename email"
            test "$(getfattr --only-values -n user.cascowfs.label.reward "$MNT/snapshots/snap-b")" = 0.5

            # the base has no branch any more: prune it; the children are self-contained
            rmdir "$MNT/snapshots/base"
            test ! -e "$MNT/snapshots/base"
            test "$(ls "$MNT/snapshots")" = "$(printf 'snap-a\nsnap-b')"
            diff -r --no-dereference "$BASE/exp-a" "$MNT/snapshots/snap-a"
            diff -r --no-dereference "$BASE/exp-b" "$MNT/snapshots/snap-b"
            getfattr -n user.note "$MNT/snapshots/snap-b/json/encoder.py" | grep -q 'from b'
            # hard links survive: one inode, two names
            test "$(stat -c %i "$MNT/snapshots/snap-a/json/hardlink.py")" = \
                 "$(stat -c %i "$MNT/snapshots/snap-a/json/scanner.py")"
            test "$(stat -c %h "$MNT/snapshots/snap-a/json/hardlink.py")" = 2
            # modes and mtimes survive
            test "$(stat -c %a "$MNT/snapshots/snap-b/json/decoder.py")" = 600
            test "$(stat -c %Y "$MNT/snapshots/snap-a/json/encoder.py")" = \
                 "$(stat -c %Y "$BASE/exp-a/json/encoder.py")"
            # branches keep working on their new parents, and a new branch of a snapshot sees it
            echo more >> "$(readlink "$MNT/branches/a/tree")/added a.txt"
            echo "branch a2 snap-a" > "$MNT/ctl"
            diff -r --no-dereference "$BASE/exp-a" "$MNT/branches/a2/tree/"
            echo "discard a2" > "$MNT/ctl"
            test ! -e "$MNT/branches/a2"
        """)
