#!/usr/bin/env bash
# The micro-VM test: cascowfs under systemd as PID 1 in a real Debian guest, killed, hung and
# power-cut, then checked from inside the guest.
#
#   tools/vmtest.sh [CUTS]     CUTS power cuts (default $VMTEST_CUTS or 20)
#
# 1. Installs qemu and debootstrap (tools/vm/install.sh) and builds or reuses the image
#    (tools/vm/build-image.sh, cached under /var/cache/cascowfs-vmtest by a hash of its inputs).
# 2. Boot "lifecycle": the unit is active after READY=1; STATUS=; the fstab mount; the agent's
#    ops; kill -9 of the daemon -> restarted by systemd, branches re-adopted with their
#    uncommitted files; SIGSTOP -> restarted by the watchdog; systemctl stop; fsck --deep.
# 3. CUTS times: boot "cycle" (every acknowledged op present, every branch back at its parent,
#    fsck --deep clean), start the agent, kill qemu at a random moment: the disk is a raw file
#    opened with cache=none, so what the guest had not flushed is lost, as in a power cut.
# 4. Boot "final": the checks once more and a clean shutdown.
# The guest reports on its second serial port; its console goes to a log kept on failure and
# to a socket (root logs in without a password: socat - UNIX-CONNECT:WORKDIR/console.sock).
# KVM is used when it can boot a stock kernel; otherwise (no /dev/kvm, or a PVM-only KVM inside
# a micro-VM) the guest runs under TCG emulation, several times slower, and says so.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cuts="${1:-${VMTEST_CUTS:-20}}"
restarts="${VMTEST_RESTARTS:-3}"
started=$(date +%s)

bash "$repo/tools/vm/install.sh"
image=$(bash "$repo/tools/vm/build-image.sh")
built=$(date +%s)

if [ -w /dev/kvm ] && [ ! -d /sys/module/kvm_pvm ]; then
    accel=(-accel kvm -cpu host -smp 2)
    boot_timeout=180
    cut_after=6  # the agent runs up to this many seconds before the cut
else
    echo "vmtest: ******** KVM cannot boot a stock kernel here ($( [ -d /sys/module/kvm_pvm ] &&
          echo "this machine's KVM is kvm_pvm, which runs only PVM guest kernels" ||
          echo "no writable /dev/kvm")): running the guest under TCG emulation ********" >&2
    # One vCPU: with two, multi-threaded TCG (qemu 7.2) now and then lets a guest kernel
    # oops (int3) while it patches its own code at boot.
    accel=(-accel tcg -cpu max -smp 1)
    boot_timeout=900
    cut_after=20
fi

work=$(mktemp -d /tmp/cascowfs-vmtest.XXXXXX)
qemu_pid=""
cleanup() {
    if [ -n "$qemu_pid" ] && kill -0 "$qemu_pid" 2>/dev/null; then
        kill -9 "$qemu_pid"
        wait "$qemu_pid" 2>/dev/null || true
    fi
}
trap cleanup EXIT
cp --sparse=always "$image/disk.img" "$work/disk.img"

boots=0
boot() {  # boot PHASE [KERNEL ARGS...]: start the guest; its report goes to $report
    boots=$((boots + 1))
    report="$work/report-$boots-$1.log"
    console="$work/console-$boots-$1.log"
    : > "$report"
    qemu-system-x86_64 -M q35 "${accel[@]}" -m 1536 -nodefaults -no-user-config \
        -display none -no-reboot -monitor none \
        -kernel "$image/vmlinuz" -initrd "$image/initrd.img" \
        -append "root=/dev/vda rw console=ttyS0 panic=-1 vmtest.phase=$1 vmtest.restarts=$restarts ${*:2}" \
        -drive "file=$work/disk.img,format=raw,if=virtio,cache=none,aio=native" \
        -chardev "socket,id=console,path=$work/console.sock,server=on,wait=off,logfile=$console" \
        -serial chardev:console -serial "file:$report" &
    qemu_pid=$!
}
fail() {
    echo "vmtest: FAILED: $*" >&2
    echo "--- report ($report) ---" >&2; cat "$report" >&2
    echo "--- console, last lines ($console) ---" >&2; tail -40 "$console" >&2
    echo "vmtest: logs kept in $work" >&2
    exit 1
}
wait_for() {  # wait_for WORD: until the report has a "VMTEST WORD" line
    local deadline=$(( $(date +%s) + boot_timeout ))
    while ! grep -q "^VMTEST $1" "$report"; do
        grep -q "^VMTEST FAIL" "$report" && fail "$(grep "^VMTEST FAIL" "$report")"
        kill -0 "$qemu_pid" 2>/dev/null || fail "the guest stopped before 'VMTEST $1'"
        [ "$(date +%s)" -lt "$deadline" ] || fail "no 'VMTEST $1' within ${boot_timeout}s"
        sleep 0.2
    done
}
wait_poweroff() {
    local deadline=$(( $(date +%s) + 120 ))
    while kill -0 "$qemu_pid" 2>/dev/null; do
        [ "$(date +%s)" -lt "$deadline" ] || fail "the guest did not power off"
        sleep 0.2
    done
    wait "$qemu_pid" || true
    qemu_pid=""
}
ready_ms=()
note_ready() { ready_ms+=("$(sed -n 's/^VMTEST ready_ms=\([0-9]*\).*/\1/p' "$report" | head -1)"); }

boot lifecycle
wait_for DONE
wait_poweroff
note_ready
grep "^VMTEST" "$report" | sed 's/^/vmtest: lifecycle: /'

survived=0
cut_arg=""
for i in $(seq "$cuts"); do
    boot cycle $cut_arg
    wait_for AGENT-RUNNING
    note_ready
    grep "^VMTEST verify" "$report" | sed "s/^/vmtest: boot $boots: /" || true
    [ "$i" -gt 1 ] && survived=$((survived + 1))
    sleep "$((RANDOM % cut_after + 1)).$((RANDOM % 10))"  # the agent is mid-loop: cut the power
    kill -9 "$qemu_pid"
    wait "$qemu_pid" 2>/dev/null || true
    qemu_pid=""
    echo "vmtest: power cut $i of $cuts" >&2
    cut_arg=vmtest.cut=1
done

boot final $cut_arg
wait_for DONE
wait_poweroff
note_ready
[ "$cuts" -gt 0 ] && survived=$((survived + 1))
grep "^VMTEST" "$report" | sed 's/^/vmtest: final: /'
ops=$(sed -n 's/^VMTEST verify {"ops_acknowledged": \([0-9]*\).*/\1/p' "$report" | tail -1)
sorted=$(printf '%s\n' "${ready_ms[@]}" | sort -n)
echo "vmtest: PASSED: boot to READY=1 $(echo "$sorted" | head -1)-$(echo "$sorted" | tail -1) ms" \
     "(median $(echo "$sorted" | sed -n "$(( (${#ready_ms[@]} + 1) / 2 ))p") ms, ${#ready_ms[@]} boots);" \
     "kill -9 restarts survived $restarts; watchdog restart 1; power cuts survived $survived;" \
     "acknowledged ops verified ${ops:-0}; image $((built - started)) s; boots $(( $(date +%s) - built )) s"
rm -rf "$work"
