#!/usr/bin/env bash
# Make sure the system tools the network-namespace tests need are present:
#   ip   (Debian package iproute2)  -- namespaces, veth pairs, addresses, routes
#   nft  (Debian package nftables)  -- NAT, random loss, "drop unsolicited inbound"
#   miniupnpd (Debian package miniupnpd-nftables) -- the UPnP-IGD / NAT-PMP / PCP daemon
#        the port-mapping tests run in a NAT router's namespace (the binary only: the
#        `miniupnpd` package would also configure and start a system service)
#
# Idempotent and silent when everything is already installed.
# Installs the missing packages with apt-get only when we are root and apt-get exists
# (`make test` and `make soak` run this: as root they install packages), and never when
# QP2P_NO_SYSDEPS is set to a non-empty value other than 0.
# Never fails the build: without root (or apt) it prints a note to stderr and exits 0;
# the netns tests then skip with a precise reason.
set -u

missing=()
command -v ip  >/dev/null 2>&1 || missing+=(iproute2)
command -v nft >/dev/null 2>&1 || missing+=(nftables)
[ -x /usr/sbin/miniupnpd ]       || missing+=(miniupnpd-nftables)

[ ${#missing[@]} -eq 0 ] && exit 0

note() { echo "ensure-system-deps: $*" >&2; }

if [ -n "${QP2P_NO_SYSDEPS:-}" ] && [ "${QP2P_NO_SYSDEPS}" != 0 ]; then
    note "missing ${missing[*]}; QP2P_NO_SYSDEPS is set, not installing (netns tests will skip)."
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    note "missing ${missing[*]} and not root; not installing (netns tests will skip)."
    note "install with: sudo apt-get install -y ${missing[*]}"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    note "missing ${missing[*]} and no apt-get here; install them with your package manager."
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
note "installing ${missing[*]} ..."
log=$(mktemp)
if apt-get update -q >"$log" 2>&1 \
   && apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$log" 2>&1; then
    note "installed ${missing[*]}."
else
    note "apt-get failed (netns tests will skip); last lines:"
    tail -n 15 "$log" >&2
fi
rm -f "$log"
exit 0
