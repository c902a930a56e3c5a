#!/usr/bin/env bash
# Unpacks Cyrus IMAP 3.6 and Courier-IMAP 5.0 (Debian 12 packages) into DIR for the integration
# tests (tests/it/support/cyrus.rs, courier.rs). Usage: fetch-backends.sh [DIR]
# (default /opt/imapgate-test-backends; the tests read IMAPGATE_TEST_BACKENDS, same default).
#
# cyrus-imapd and courier-imap conflict with dovecot-imapd (Conflicts: imap-server) and their
# maintainer scripts create users and start services, so they are never installed: their .debs
# are fetched with `apt-get download` and unpacked with `dpkg-deb -x` into DIR/cyrus and
# DIR/courier. Only plain shared libraries they link against are apt-get installed (when
# missing); none of them conflicts with Dovecot or starts a service.
#
# Courier's authlib has three paths compiled in that a private instance must not share:
# /run/courier/authdaemon/socket (libcourierauth and authdaemond), /etc/courier/authdaemonrc
# (authdaemond) and /etc/courier/userdb{,shadow}.dat (libauthuserdb). No environment variable
# overrides them, so this script patches the unpacked copies, byte for byte and with the same
# length, to relative paths ("././././././/authdaemon/socket" and so on): authdaemond and
# couriertcpd run with the instance's temp dir as their working directory, so every instance
# has its own socket, config and userdb. (gcc builds the socket path from two overlapping
# 16-byte pieces, so only the first 16 bytes, "/run/courier/aut", are replaced.)
#
# Idempotent: a stamp file records what was unpacked; a second run only checks the libraries.
set -euo pipefail

DIR="${1:-/opt/imapgate-test-backends}"
STAMP_VERSION="imapgate-test-backends 1"

CYRUS_DEBS=(cyrus-imapd cyrus-common sasl2-bin)
COURIER_DEBS=(courier-imap courier-base courier-authlib courier-authdaemon courier-authlib-userdb)
# Shared libraries (and tools) the unpacked binaries need, from the packages' Depends.
LIBS=(
  # cyrus-imapd, cyrus-common
  libc6 libcom-err2 libsasl2-2 libssl3 libwrap0 zlib1g libsasl2-modules libclamav12 libgcc-s1
  libical3 libicu72 libjansson4 libkrb5-3 libldap-2.5-0 libpcre3 libpq5 libsqlite3-0
  libstdc++6 libxapian30 libxml2 libzephyr4
  # sasl2-bin (saslpasswd2 writes the sasldb)
  libsasl2-modules-db libdb5.3 libcrypt1 libpam0g
  # courier-imap, courier-base, courier-authlib
  libcourier-unicode4 libgamin0 libgdbm6 libidn12 libgnutls30 libltdl7
  # tools the tests call: openssl (password hashes for Courier's userdb), perl (this script)
  openssl perl-base
)

export DEBIAN_FRONTEND=noninteractive
updated=no
apt_update() {
  if [ "$updated" = no ]; then
    apt-get update -qq
    updated=yes
  fi
}

missing=()
for p in "${LIBS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed'; then
    missing+=("$p")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "== fetch-backends: installing ${missing[*]}"
  apt_update
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ -f "$DIR/STAMP" ] && [ "$(cat "$DIR/STAMP")" = "$STAMP_VERSION" ]; then
  echo "== fetch-backends: $DIR is up to date"
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# apt-get download drops privileges to _apt; let it write here.
chown _apt "$work" 2>/dev/null || true

download() {
  (cd "$work" && apt-get download -q "$@" >/dev/null)
}
echo "== fetch-backends: downloading ${CYRUS_DEBS[*]} ${COURIER_DEBS[*]}"
if ! download "${CYRUS_DEBS[@]}" "${COURIER_DEBS[@]}"; then
  apt_update
  download "${CYRUS_DEBS[@]}" "${COURIER_DEBS[@]}"
fi

new="$DIR.new"
rm -rf "$new"
mkdir -p "$new/cyrus" "$new/courier"
for p in "${CYRUS_DEBS[@]}"; do dpkg-deb -x "$work/${p}"_*.deb "$new/cyrus"; done
for p in "${COURIER_DEBS[@]}"; do dpkg-deb -x "$work/${p}"_*.deb "$new/courier"; done

# Same-length replacement of every occurrence of OLD by NEW in FILE; fails if OLD is absent.
patch_bytes() {
  perl -e '
    my ($file, $old, $new) = @ARGV;
    die "length mismatch\n" if length($old) != length($new);
    open(my $fh, "<:raw", $file) or die "$file: $!\n";
    my $data = do { local $/; <$fh> };
    close $fh;
    my $n = ($data =~ s/\Q$old\E/$new/g);
    die "$file: \"$old\" not found\n" unless $n;
    open($fh, ">:raw", $file) or die "$file: $!\n";
    print $fh $data;
    close $fh;
  ' "$@"
}
c="$new/courier"
patch_bytes "$c/usr/lib/libcourierauth.so.0.0.0" /run/courier/aut ././././././/aut
patch_bytes "$c/usr/lib/courier/courier-authlib/authdaemond" /run/courier/aut ././././././/aut
patch_bytes "$c/usr/lib/courier/courier-authlib/authdaemond" /etc/courier/ ././././././/
patch_bytes "$c/usr/lib/courier-authlib/libauthuserdb.so.0.0.0" /etc/courier/ ././././././/
# The compiled-in paths must be gone (a leftover would make instances share a socket).
if grep -qa '/run/courier/aut\|/etc/courier/authdaemonrc\|/etc/courier/userdb' \
  "$c/usr/lib/libcourierauth.so.0.0.0" "$c/usr/lib/courier/courier-authlib/authdaemond" \
  "$c/usr/lib/courier-authlib/libauthuserdb.so.0.0.0"; then
  echo "fetch-backends: a Courier path is left unpatched" >&2
  exit 1
fi

for f in "$work"/*.deb; do basename "$f"; done >"$new/PACKAGES"
echo "$STAMP_VERSION" >"$new/STAMP"
chmod 755 "$new"
rm -rf "$DIR"
mv "$new" "$DIR"
echo "== fetch-backends: unpacked into $DIR:"
sed 's/^/   /' "$DIR/PACKAGES"
