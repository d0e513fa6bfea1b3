#!/bin/bash
# The guest's side of tools/vmtest.sh: runs the phase named on the kernel command line and
# reports "VMTEST ..." lines on the second serial port (/dev/ttyS1), which the host reads.
#   lifecycle  unit active after READY, STATUS=, the fstab mount, agent ops, kill -9 and
#              restarts (branches re-adopted with their uncommitted files), a SIGSTOPped
#              daemon restarted by the watchdog, a clean stop, fsck --deep; then power off
#   cycle      (after a power cut with vmtest.cut=1) every acknowledged op present, every
#              branch back at its parent, fsck --deep clean; then the agent runs until the
#              host cuts the power again
#   final      the checks of a cycle, a clean stop; then power off
set -uo pipefail
exec >/dev/ttyS1 2>&1
UNIT=cascowfs@mnt-cascowfs.service
MNT=/mnt/cascowfs
STORE=/var/lib/cascowfs/store
AGENT=/usr/local/lib/vmtest/agent.py
phase=$(sed -n 's/.*vmtest\.phase=\([a-z]*\).*/\1/p' /proc/cmdline)
cut=$(grep -c 'vmtest\.cut=1' /proc/cmdline)
RESTARTS=$(sed -n 's/.*vmtest\.restarts=\([0-9]*\).*/\1/p' /proc/cmdline)

say() { echo "VMTEST $*"; }
fail() {
    say "FAIL $*"
    journalctl -b --no-pager -n 80 -u "$UNIT"
    systemctl poweroff
    exit 1
}
prop() { systemctl show -p "$1" --value "$UNIT"; }
served() { [ "$(findmnt -n -o FSTYPE --mountpoint "$1")" = fuse.cascowfs ]; }
WAIT_SECONDS=600  # generous: under TCG emulation a daemon start takes a minute or more
wait_active() {  # until the unit is active (READY=1 seen) and MNT is served
    local deadline=$(( $(date +%s) + WAIT_SECONDS ))
    until systemctl is-active -q "$UNIT" && served "$MNT"; do
        [ "$(date +%s)" -lt "$deadline" ] || fail "$UNIT not active: $(systemctl is-active "$UNIT")"
        sleep 0.5
    done
}
wait_restarted() {  # $1: NRestarts before
    local deadline=$(( $(date +%s) + WAIT_SECONDS ))
    until [ "$(prop NRestarts)" -gt "$1" ] && systemctl is-active -q "$UNIT" && served "$MNT"; do
        [ "$(date +%s)" -lt "$deadline" ] ||
            fail "$UNIT not restarted (NRestarts $(prop NRestarts), $(systemctl is-active "$UNIT"))"
        sleep 0.5
    done
}
verify() {  # every acknowledged op is there ($1: --power-cut to check branches too)
    local out
    out=$(python3 "$AGENT" verify "$@") || fail "verify: $out"
    say "verify $out"
}
check_store_offline() {  # stop the daemon (branch mounts stay), fsck --deep, start again
    systemctl stop "$UNIT" || fail "systemctl stop"
    served "$MNT" && fail "$MNT still served after systemctl stop"
    [ "$(prop MainPID)" = 0 ] || fail "daemon still running after stop"
    local fsck
    say "step fsck --deep"
    fsck=$(cascowfs fsck --deep "$STORE" 2>&1) || fail "fsck --deep: $fsck"
    local branches overlays
    branches=$(find "$STORE/branches" -mindepth 1 -maxdepth 1 -type d | wc -l)
    overlays=$(findmnt -n -t overlay -o TARGET | grep -c "^$STORE/" || true)
    [ "$overlays" = "$branches" ] || fail "$overlays overlay mounts for $branches branches"
    say "stopped cleanly; fsck --deep clean; $overlays overlay mounts for $branches branches"
    systemctl start "$UNIT" || fail "systemctl start"
    wait_active
}
report_ready() {
    say "ready_ms=$(( $(prop ActiveEnterTimestampMonotonic) / 1000 )) restarts=$(prop NRestarts)"
}

case "$phase" in
lifecycle)
    wait_active
    report_ready
    status=$(prop StatusText)
    [[ $status == *"branches"*"snapshots"* ]] || fail "STATUS= says '$status'"
    say "status $status"
    served /mnt/fstab || fail "the fstab line's mount /mnt/fstab is not served"
    say "fstab mount served by $(getfattr --absolute-names --only-values -n user.cascowfs.pid /mnt/fstab)"
    say "security $(systemd-analyze security "$UNIT" | tail -1)"
    python3 "$AGENT" run --ops 60 || fail "agent"
    verify
    for i in $(seq "${RESTARTS:-3}"); do
        branch=$(ls "$MNT/branches" | head -1)
        [ -n "$branch" ] || fail "no branch to keep work in"
        tree=$(readlink "$MNT/branches/$branch/tree")
        head -c 100000 /dev/urandom > "$tree/uncommitted-$i"
        sum=$(sha256sum < "$tree/uncommitted-$i")
        before=$(prop NRestarts)
        say "step kill -9 $i"
        systemctl kill -s KILL --kill-who=main "$UNIT"
        wait_restarted "$before"
        [ "$(sha256sum < "$MNT/branches/$branch/tree/uncommitted-$i")" = "$sum" ] ||
            fail "uncommitted file of branch $branch lost across a kill -9"
        verify
        python3 "$AGENT" run --ops 20 || fail "agent after restart $i"
        say "restart $i: re-adopted, nothing lost"
    done
    before=$(prop NRestarts)
    stopped_at=$(date +%s)
    say "step SIGSTOP"
    kill -STOP "$(prop MainPID)"
    wait_restarted "$before"
    journalctl -b --no-pager -u "$UNIT" | grep -q "Watchdog timeout" ||
        fail "restarted, but not by the watchdog"
    say "watchdog restarted a stopped daemon after $(( $(date +%s) - stopped_at )) s"
    verify
    check_store_offline
    verify
    systemctl stop "$UNIT"
    served "$MNT" && fail "served after the last stop"
    say DONE
    systemctl poweroff
    ;;
cycle | final)
    wait_active
    report_ready
    if [ -s /var/lib/vmtest/acks.log ]; then
        if [ "$cut" = 1 ]; then verify --power-cut; else verify; fi
    fi
    check_store_offline
    if [ "$phase" = final ]; then
        for doc in $(prop Documentation); do
            [ -f "${doc#file:}" ] || fail "$UNIT's Documentation= names $doc, which is missing"
        done
        systemctl stop "$UNIT"
        served "$MNT" && fail "served after the last stop"
        say DONE
        systemctl poweroff
    else
        systemctl start vmtest-agent.service
        say AGENT-RUNNING
    fi
    ;;
*)
    say "FAIL no vmtest.phase= on the kernel command line"
    ;;
esac
