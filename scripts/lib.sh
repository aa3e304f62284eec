# shellcheck shell=bash
# shellcheck disable=SC2034 # HV_* constants are for the scripts that source this
# Shared helpers for the hvnet scripts. Source it, do not run it:
#   . "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# It sets HV_ROOT (workspace root) and HV_PROG (the calling script's name).
# Every helper reports errors as "<script>: error: ..." on stderr.

HV_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HV_PROG="$(basename "$0")"
# Where scripts/build leaves the image kernel (ELF64, Multiboot2 header + PVH note).
HV_TARGET="${CARGO_TARGET_DIR:-$HV_ROOT/target}"
HV_DEFAULT_KERNEL="$HV_TARGET/x86_64-unknown-none/release/hvnet"
# Sector and MiB sizes used by the disk layout code.
HV_SECTOR=512
HV_MIB=$((1024 * 1024))

hv_log() { printf '%s: %s\n' "$HV_PROG" "$*" >&2; }
hv_warn() { printf '%s: warning: %s\n' "$HV_PROG" "$*" >&2; }
hv_die() {
    printf '%s: error: %s\n' "$HV_PROG" "$*" >&2
    exit 2
}

# Seconds since the epoch with microseconds (bash 5 has it built in; date otherwise).
hv_now() {
    if [ -n "${EPOCHREALTIME:-}" ]; then
        printf '%s\n' "${EPOCHREALTIME/,/.}"
    else
        date +%s.%N
    fi
}

# hv_elapsed START [END]: END-START in seconds with two decimals.
hv_elapsed() {
    local end="${2:-$(hv_now)}"
    awk -v a="$1" -v b="$end" 'BEGIN { printf "%.2f\n", b - a }'
}

# Run scripts/setup once per process tree (children inherit HVNET_SETUP_DONE).
hv_setup() {
    if [ "${HVNET_SETUP_DONE:-}" != 1 ]; then
        "$HV_ROOT/scripts/setup" || hv_die "scripts/setup failed"
        export HVNET_SETUP_DONE=1
    fi
}

# hv_need CMD...: fail clearly when a tool is missing (setup should have installed it).
hv_need() {
    local c
    for c in "$@"; do
        command -v "$c" >/dev/null 2>&1 || hv_die "'$c' not found (run scripts/setup; it installs it)"
    done
}

# hv_kernel [PATH]: print the kernel to use. With PATH, that file; without it, run
# scripts/build when it exists, then take the default build output.
hv_kernel() {
    local k="${1:-}"
    if [ -z "$k" ]; then
        k="$HV_DEFAULT_KERNEL"
        if [ -x "$HV_ROOT/scripts/build" ]; then
            # scripts/build prints the kernel's path as its last line of stdout.
            local built
            built="$("$HV_ROOT/scripts/build" | tail -n 1)" || hv_die "scripts/build failed"
            [ -z "$built" ] || k="$built"
        fi
        [ -f "$k" ] || hv_die "no kernel at ${k#"$HV_ROOT"/} (and no scripts/build to make it); pass --kernel PATH"
    fi
    [ -f "$k" ] || hv_die "kernel not found: $k"
    [ -r "$k" ] || hv_die "kernel not readable: $k"
    printf '%s\n' "$(cd "$(dirname "$k")" && pwd)/$(basename "$k")"
}

# hv_check_multiboot2 KERNEL: the GRUB disk images need a Multiboot2 header.
hv_check_multiboot2() {
    if command -v grub-file >/dev/null 2>&1; then
        grub-file --is-x86-multiboot2 "$1" ||
            hv_die "$1 has no valid Multiboot2 header in its first 32 KiB (GRUB cannot boot it)"
    fi
}

# hv_ovmf: print "CODE VARS" for a matching pair of OVMF firmware files (no Secure Boot:
# the GRUB images are unsigned). OVMF_DIR overrides the search.
hv_ovmf() {
    local d code vars
    for d in ${OVMF_DIR:-} /usr/share/OVMF /usr/share/ovmf /usr/share/edk2/ovmf /usr/share/edk2-ovmf/x64 /usr/share/qemu; do
        [ -d "$d" ] || continue
        # Code and vars must come from the same build flavour (the 4M ones pair together).
        for code in OVMF_CODE_4M.fd OVMF_CODE.fd; do
            vars="${code/CODE/VARS}"
            if [ -f "$d/$code" ] && [ -f "$d/$vars" ]; then
                printf '%s %s\n' "$d/$code" "$d/$vars"
                return 0
            fi
        done
    done
    hv_die "no OVMF firmware (OVMF_CODE*.fd + OVMF_VARS*.fd) in /usr/share/OVMF or /usr/share/ovmf; install the 'ovmf' package or set OVMF_DIR"
}

# hv_sha256 FILE|-: the hex digest only.
hv_sha256() { sha256sum "$@" | awk '{ print $1 }'; }

# hv_put_le FILE OFFSET BYTES VALUE: write VALUE little-endian as BYTES bytes at OFFSET,
# in place (no truncation).
hv_put_le() {
    local file="$1" off="$2" n="$3" val="$4" i hex=""
    for ((i = 0; i < n; i++)); do
        hex+=$(printf '\\x%02x' $(((val >> (8 * i)) & 0xff)))
    done
    printf '%b' "$hex" | dd of="$file" bs=1 seek="$off" conv=notrunc status=none
}

# hv_get_le FILE OFFSET BYTES: read an unsigned little-endian integer.
hv_get_le() {
    local v
    v=$(od -An -v -j "$2" -N "$3" -t u"$3" --endian=little "$1" | tr -d ' \n')
    printf '%s\n' "${v:-0}"
}

# hv_kvm_unusable: print why /dev/kvm cannot be used here and succeed; fail (print
# nothing) when it can be opened read-write.
hv_kvm_unusable() {
    if [ ! -e /dev/kvm ]; then
        echo "/dev/kvm does not exist (no KVM on this machine)"
    elif ! { exec 9<>/dev/kvm; } 2>/dev/null; then
        echo "/dev/kvm cannot be opened by $(id -un) (permissions, or KVM unusable)"
    else
        exec 9>&-
        return 1
    fi
}

# hv_vmm: build hvemu-vmm (release) and print its path.
hv_vmm() {
    (cd "$HV_ROOT" && cargo build --quiet --release -p hvemu --bin hvemu-vmm >&2) ||
        hv_die "building hvemu-vmm failed"
    local v="${CARGO_TARGET_DIR:-$HV_ROOT/target}/release/hvemu-vmm"
    [ -x "$v" ] || hv_die "no hvemu-vmm at $v after the build"
    printf '%s\n' "$v"
}
