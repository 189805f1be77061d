#!/bin/sh
# Install machined on Debian 12: system packages, the package in its own virtual environment,
# the mctl command and the systemd units. With --demo, also create and boot a demo machine
# from the built-in busybox template (no network needed) and show its status.
set -eu
cd "$(dirname "$0")"

PREFIX=${MACHINED_PREFIX:-/opt/machined}
BINDIR=${MACHINED_BINDIR:-/usr/local/bin}
UNITDIR=${MACHINED_UNITDIR:-/usr/local/lib/systemd/system}

if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root (sudo ./install.sh)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# Runtime: busybox-static for the busybox template, mmdebstrap/debootstrap for Debian images,
# nftables and iproute2 for networking, libudev1 for device lookups and hotplug (pyudev),
# python3-venv for the package's environment.
apt-get install -y -qq --no-install-recommends \
    python3 python3-venv busybox-static mmdebstrap debootstrap debian-archive-keyring \
    nftables iproute2 dnsmasq-base zstd xz-utils ca-certificates util-linux libudev1 >/dev/null

if [ -d /run/systemd/system ]; then
    # systemd-machined and machinectl: machines are registered with them where systemd runs.
    apt-get install -y -qq --no-install-recommends systemd-container >/dev/null
fi

/usr/bin/python3 -m venv "$PREFIX"
"$PREFIX/bin/pip" install -q --disable-pip-version-check .
# setuptools is only needed to build; its .pth hook would cost every mctl call a millisecond.
"$PREFIX/bin/pip" uninstall -q -y setuptools >/dev/null 2>&1 || true
ln -sf "$PREFIX/bin/mctl" "$BINDIR/mctl"

mkdir -p "$UNITDIR"
for unit in units/*; do
    [ -f "$unit" ] || continue
    sed "s|@MCTL@|$BINDIR/mctl|g" "$unit" > "$UNITDIR/$(basename "$unit")"
done
install -D -m 0644 packaging/machined.tmpfiles /usr/local/lib/tmpfiles.d/machined.conf
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi
echo "machined installed: $($BINDIR/mctl --help >/dev/null && echo "$BINDIR/mctl")"

if [ "${1:-}" = "--demo" ]; then
    if ! mctl show demo >/dev/null 2>&1; then
        mctl create demo --template busybox
    fi
    mctl show demo -p State --value | grep -q running || mctl start demo
    mctl status demo
    echo
    echo "Try: mctl shell demo, mctl console demo (^] three times leaves), mctl poweroff demo"
fi
