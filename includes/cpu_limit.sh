{#- Shell code shared by the scripts that size a server to its container (nginx's workers, uvicorn's):
    sets $cpus to the CPUs this container may use: its CPU limit (cgroup v2 cpu.max, else v1 CFS
    quota) rounded up, never more than the CPUs it may run on (nproc), 1 when no limit is readable.
    Counting the host's CPUs instead (nginx's "auto", a plain nproc on cgroup v1) would start, in a
    container limited to one CPU on a 32-core host, 32 processes that share one CPU's time and use
    32 times the memory. CGROUP_DIR: where the cgroup files are (tests point it at fake ones). -#}
cgroup="${CGROUP_DIR:-/sys/fs/cgroup}"

if [ -r "$cgroup/cpu.max" ]; then
    read -r quota period <"$cgroup/cpu.max"
elif [ -r "$cgroup/cpu/cpu.cfs_quota_us" ] && [ -r "$cgroup/cpu/cpu.cfs_period_us" ]; then
    quota="$(cat "$cgroup/cpu/cpu.cfs_quota_us")"
    period="$(cat "$cgroup/cpu/cpu.cfs_period_us")"
else
    quota="" period=""
fi

usable="$(nproc)"
case "$quota:$period" in
    max:* | -1:*)
        # No CPU limit: every CPU the container may run on.
        cpus="$usable"
        ;;
    *[!0-9:]* | :* | *: | *:0)
        # Nothing readable (or nonsense): one.
        cpus=1
        ;;
    *)
        cpus=$(((quota + period - 1) / period))
        [ "$cpus" -le "$usable" ] || cpus="$usable"
        [ "$cpus" -ge 1 ] || cpus=1
        ;;
esac
