#!/usr/bin/env bash
# Installs what the node agent (controller/checkpoint) and its tests need on a Debian bookworm
# node: runc, iptables (CRIU locks a container's network with iptables-restore), python3-numpy
# (the demo workloads), and CRIU >= 4 from Debian trixie in a private prefix.
#
# Why a private prefix: bookworm's CRIU 3.17 fails `criu check` on current kernels, and trixie's
# CRIU needs trixie's glibc. Installing it with apt would upgrade the system's libc, so instead we
# download the trixie packages (signature-checked by apt), unpack them under $PREFIX and put a
# `criu` wrapper on PATH that runs the binary through that prefix's own dynamic loader. Nothing
# outside $PREFIX and $BIN_DIR/criu is changed by that part.
#
# Safe to run twice: every step checks first and does nothing when its result is already there.
# Run as root. Exits non-zero, saying why, if `criu check` does not pass at the end.
set -euo pipefail

PREFIX=${AUTOMIGRATE_CRIU_PREFIX:-/opt/automigrate/criu}
BIN_DIR=${AUTOMIGRATE_BIN_DIR:-/usr/local/bin}
TRIXIE_MIRROR=${AUTOMIGRATE_TRIXIE_MIRROR:-http://deb.debian.org/debian}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
SYSTEM_PACKAGES=(runc iptables python3-numpy)

say() { printf '[install-node-deps] %s\n' "$*"; }
die() {
    printf '\n[install-node-deps] ERROR: %s\n' "$*" >&2
    exit 1
}

[[ $(id -u) -eq 0 ]] || die "run as root (it installs Debian packages and writes $PREFIX)."
command -v apt-get >/dev/null || die "apt-get not found: this script supports Debian (bookworm) only."

case "$(dpkg --print-architecture)" in
    amd64) MULTIARCH=x86_64-linux-gnu LOADER=ld-linux-x86-64.so.2 ;;
    arm64) MULTIARCH=aarch64-linux-gnu LOADER=ld-linux-aarch64.so.1 ;;
    *) die "unsupported architecture $(dpkg --print-architecture) (amd64 and arm64 are supported)" ;;
esac

# --- 1. Packages from the system's own release ------------------------------------------------
missing=()
for package in "${SYSTEM_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$package")
    fi
done
if ((${#missing[@]})); then
    say "installing from the system's release: ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
else
    say "already installed: ${SYSTEM_PACKAGES[*]}"
fi

# --- 2. CRIU from trixie in $PREFIX -----------------------------------------------------------
ROOT="$PREFIX/root"
STAMP="$PREFIX/installed-packages.txt"
WRAPPER="$BIN_DIR/criu"

write_wrapper() {
    local tmp
    tmp=$(mktemp "$BIN_DIR/.criu.XXXXXX")
    cat >"$tmp" <<WRAPPER_EOF
#!/bin/sh
# CRIU from Debian trixie, unpacked in $PREFIX by scripts/install-node-deps.sh.
# It runs through the loader and glibc of that prefix so the system's libc stays as it is.
exec "$ROOT/usr/lib/$MULTIARCH/$LOADER" --argv0 criu --library-path "$ROOT/usr/lib/$MULTIARCH:$ROOT/lib/$MULTIARCH" "$ROOT/usr/sbin/criu" "\$@"
WRAPPER_EOF
    chmod 0755 "$tmp"
    mv -f "$tmp" "$WRAPPER"
}

criu_major() {
    "$WRAPPER" --version 2>/dev/null | sed -n 's/^Version: \([0-9]*\)\..*/\1/p'
}

if [[ -f $STAMP && -x $ROOT/usr/sbin/criu ]]; then
    say "CRIU already unpacked in $ROOT ($(wc -l <"$STAMP") trixie packages, listed in $STAMP)"
else
    [[ -f $KEYRING ]] || die "$KEYRING is missing: install debian-archive-keyring"
    APT_DIR="$PREFIX/apt"
    mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/cache/archives/partial" "$APT_DIR/debs"
    echo "deb [signed-by=$KEYRING] $TRIXIE_MIRROR trixie main" >"$APT_DIR/sources.list"
    # A private sources list, lists, cache and preferences: the system's apt state is untouched
    # and never learns about trixie, so no later `apt-get upgrade` can pull trixie's libc in.
    APT_OPTS=(
        -o "Dir::Etc::SourceList=$APT_DIR/sources.list"
        -o "Dir::Etc::SourceParts=/dev/null"
        -o "Dir::Etc::Preferences=/dev/null"
        -o "Dir::Etc::PreferencesParts=/dev/null"
        -o "Dir::State::Lists=$APT_DIR/lists"
        -o "Dir::Cache=$APT_DIR/cache"
        -o "APT::Sandbox::User=root"
    )
    say "reading the trixie package lists into $APT_DIR (private; the system's apt is not changed)"
    apt-get "${APT_OPTS[@]}" update -q
    # criu and everything it depends on, transitively (libc6 included): the prefix must be
    # self-contained so that the wrapper never mixes trixie and bookworm libraries.
    mapfile -t packages < <(
        apt-cache "${APT_OPTS[@]}" depends --recurse --no-recommends --no-suggests --no-conflicts \
            --no-breaks --no-replaces --no-enhances criu | grep -v '^ ' | grep -v '^<' | sort -u
    )
    ((${#packages[@]})) || die "could not resolve criu's dependencies from trixie"
    say "downloading ${#packages[@]} trixie packages: ${packages[*]}"
    rm -f "$APT_DIR/debs/"*.deb
    (cd "$APT_DIR/debs" && apt-get "${APT_OPTS[@]}" download -q "${packages[@]}")
    say "unpacking into $ROOT"
    rm -rf "$ROOT.new"
    mkdir -p "$ROOT.new"
    for deb in "$APT_DIR/debs/"*.deb; do
        dpkg-deb -x "$deb" "$ROOT.new"
    done
    [[ -x $ROOT.new/usr/sbin/criu ]] || die "the trixie criu package did not contain usr/sbin/criu"
    rm -rf "$ROOT"
    mv "$ROOT.new" "$ROOT"
    for deb in "$APT_DIR/debs/"*.deb; do
        dpkg-deb -f "$deb" Package Version | paste -sd' '
    done >"$STAMP.new"
    mv "$STAMP.new" "$STAMP"
    rm -rf "$APT_DIR/debs" "$APT_DIR/cache"
fi

if [[ -x $WRAPPER ]] && grep -q "$ROOT/usr/sbin/criu" "$WRAPPER" && grep -q -- "--argv0" "$WRAPPER"; then
    say "wrapper $WRAPPER already in place"
else
    say "writing wrapper $WRAPPER"
    write_wrapper
fi

# --- 3. Verify --------------------------------------------------------------------------------
resolved=$(command -v criu || true)
[[ $resolved == "$WRAPPER" ]] ||
    die "\`criu\` on PATH is '$resolved', not $WRAPPER: put $BIN_DIR first in PATH or remove the other criu (bookworm's 3.17 does not work on this kernel)"
major=$(criu_major)
[[ -n $major && $major -ge 4 ]] || die "criu --version does not report 4.x: $("$WRAPPER" --version 2>&1 | head -n1)"
say "$("$WRAPPER" --version | head -n1 | sed 's/^Version: /criu version /'), runc $(runc --version | sed -n 's/^runc version //p'), $(iptables --version)"

say "running \`criu check\`"
if ! check_output=$("$WRAPPER" check 2>&1); then
    printf '%s\n' "$check_output" >&2
    die "\`criu check\` FAILED: this kernel cannot checkpoint with CRIU (see the messages above)"
fi
say "criu check: $(printf '%s\n' "$check_output" | tail -n1)"
if "$WRAPPER" check --feature mem_dirty_track >/dev/null 2>&1; then
    say "memory dirty tracking: available (incremental pre-dump checkpoints work)"
else
    say "memory dirty tracking: NOT available (kernel without CONFIG_MEM_SOFT_DIRTY): every periodic checkpoint is a full dump"
fi
say "done"
