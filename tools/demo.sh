#!/usr/bin/env bash
# The main job, end to end on a fresh machine: install, mount a store, and show an agent's
# step with nothing but file calls: import a tree, branch it three ways, edit, commit two,
# discard one, prune, read snapshot metadata. Leaves nothing mounted.
#   bash tools/demo.sh [STORE] [MNT]
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
bash tools/install.sh
export PATH="$here/.venv/bin:$PATH"

store="${1:-/var/tmp/cascowfs-demo/store}"
mnt="${2:-/var/tmp/cascowfs-demo/mnt}"
src="$(mktemp -d /var/tmp/cascowfs-demo-src.XXXXXX)"
mkdir -p "$store" "$mnt"
cleanup() {
    cascowfs umount "$mnt" --branches 2>/dev/null || true
    rm -rf "$src"
}
trap cleanup EXIT

# a real source tree to work on: this project's own package
cp -a "$here/cascowfs" "$src/"
run() { echo "+ $*"; "$@"; }

run cascowfs mount "$store" "$mnt" --background
run cascowfs import "$mnt" "$src" demo-base 2>/dev/null || run cascowfs import "$mnt" "$src" "demo-base-$(date +%s)"
base=$(ls -t "$mnt/snapshots" | head -n 1)
echo "snapshots: $(ls "$mnt/snapshots" | tr '\n' ' ')"

for b in try-a try-b try-c; do
    run mkdir "$mnt/branches/$b-$$"
    echo "$base" > "$mnt/branches/$b-$$/parent"
done
echo "# edit made in try-a" >> "$mnt/branches/try-a-$$/tree/cascowfs/state.py"
echo "new file" > "$mnt/branches/try-b-$$/tree/NOTES.txt"
rm "$mnt/branches/try-c-$$/tree/cascowfs/cli.py"
echo "status of try-a:"; cat "$mnt/branches/try-a-$$/status"
echo "status of try-c:"; cat "$mnt/branches/try-c-$$/status"

run sh -c "echo 'commit try-a-$$ step-a-$$ reward=0.9' > '$mnt/ctl'"
run sh -c "echo step-b-$$ > '$mnt/branches/try-b-$$/commit'"
run rmdir "$mnt/branches/try-c-$$"
echo "after commit, status of try-a is empty: [$(cat "$mnt/branches/try-a-$$/status")]"
run getfattr -d -m user.cascowfs "$mnt/snapshots/step-a-$$"
run diff -r "$mnt/snapshots/step-a-$$" "$mnt/branches/try-a-$$/tree" && echo "snapshot == branch"
run rmdir "$mnt/branches/try-a-$$" "$mnt/branches/try-b-$$"
run rmdir "$mnt/snapshots/step-b-$$"
run cascowfs ls "$mnt"
echo "demo finished; store kept at $store"
