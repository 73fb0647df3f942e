#!/bin/sh
# Makes what a TLS etcd for Bulkhead needs, in DIR (default ./secrets), with openssl:
#   ca.pem ca.key          the etcd CA (keep ca.key offline once the certificates are made)
#   MEMBER.pem MEMBER.key  one per etcd member: server and peer certificate, SAN = name and IP
#   client.pem client.key  the controllers' client certificate, CN=bulkhead (etcd takes the CN
#                          as the user when no password is given: keep it the controllers' user)
#   ca-seal.key            the key that seals Bulkhead's CA key in etcd: the same file on every
#                          controller, never in etcd
#   etcd-root.password etcd-bulkhead.password   for etcd's own authentication
# Usage: make-certs.sh [DIR] MEMBER=IP...   e.g. make-certs.sh secrets etcd-1=10.0.0.11 ...
# Existing files are kept, so it can be run again to add a member.
set -eu
dir=${1:-secrets}
shift || true
mkdir -p "$dir"
cd "$dir"
umask 077
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1"; }
sign() { # NAME SUBJECT EXTENSIONS
    [ -f "$1.pem" ] && return 0
    key "$1.key"
    openssl req -new -key "$1.key" -subj "$2" -out "$1.csr"
    printf '%s\n' "$3" > "$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 825 \
        -extfile "$1.ext" -out "$1.pem"
    rm -f "$1.csr" "$1.ext"
}
if [ ! -f ca.pem ]; then
    key ca.key
    openssl req -x509 -new -key ca.key -subj "/CN=Bulkhead etcd CA" -days 3650 -out ca.pem \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
fi
for m in "$@"; do
    name=${m%%=*}
    ip=${m#*=}
    san="DNS:$name,DNS:localhost,IP:127.0.0.1"
    [ "$ip" != "$m" ] && san="$san,IP:$ip"
    sign "$name" "/CN=$name" "subjectAltName=$san
extendedKeyUsage=serverAuth,clientAuth"
done
sign client "/CN=bulkhead" "extendedKeyUsage=clientAuth"
[ -f ca-seal.key ] || openssl rand -hex 32 > ca-seal.key
[ -f etcd-root.password ] || openssl rand -hex 24 > etcd-root.password
[ -f etcd-bulkhead.password ] || openssl rand -hex 24 > etcd-bulkhead.password
rm -f ca.srl
ls -l
