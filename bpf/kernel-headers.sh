#!/usr/bin/env bash
# Make kernel headers available to bcc at /lib/modules/$(uname -r)/build.
# 1. Already there: nothing to do.
# 2. Debian has headers for this exact kernel (a real Debian VM): install them.
# 3. Otherwise (custom kernel, as on our CI machines): link Debian's generic
#    linux-headers-$ARCH (amd64, arm64: this machine's) in. bcc needs `build` -> the
#    *-$ARCH dir and `source` -> the *-common dir. Good enough for our sk_lookup program, which
#    uses only UAPI types; see NOTES.md.
set -euo pipefail
release=$(uname -r)
arch=$(dpkg --print-architecture)
moddir=/lib/modules/$release
if [ -e "$moddir/build/include" ]; then
    exit 0
fi
apt_has() { apt-cache show "$1" >/dev/null 2>&1; }
if ! apt_has "linux-headers-$release"; then
    apt-get update -qq || echo "kernel-headers: apt-get update failed; using what is installed" >&2
fi
if apt_has "linux-headers-$release"; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "linux-headers-$release" >/dev/null
    exit 0
fi
if ! ls -d /usr/src/linux-headers-*-"$arch" >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "linux-headers-$arch" >/dev/null
fi
build=$(ls -d /usr/src/linux-headers-*-"$arch" | sort -V | tail -n 1)
common=$(ls -d /usr/src/linux-headers-*-common | sort -V | tail -n 1)
mkdir -p "$moddir"
ln -sfn "$build" "$moddir/build"
ln -sfn "$common" "$moddir/source"
echo "kernel-headers: no headers package for $release; linked $build (generic Debian headers)"
