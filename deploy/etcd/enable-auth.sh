#!/bin/sh
# Turns on etcd's authentication for Bulkhead, once, on a running TLS cluster: a root user
# (etcd requires one), and a `bulkhead` user whose role may use /bulkhead/ only. Needs etcdctl
# and the files from make-certs.sh. Usage: enable-auth.sh DIR https://10.0.0.11:2379,...
set -eu
dir=$1
endpoints=$2
ctl() {
    etcdctl --endpoints "$endpoints" --cacert "$dir/ca.pem" --cert "$dir/client.pem" \
        --key "$dir/client.key" "$@"
}
ctl user add root --new-user-password "$(cat "$dir/etcd-root.password")"
ctl user grant-role root root
ctl role add bulkhead
ctl role grant-permission bulkhead --prefix=true readwrite /bulkhead/
ctl user add bulkhead --new-user-password "$(cat "$dir/etcd-bulkhead.password")"
ctl user grant-role bulkhead bulkhead
ctl auth enable
echo "etcd authentication enabled; root password in $dir/etcd-root.password"
