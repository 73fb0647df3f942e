#!/usr/bin/env bash
# RustSec advisories for every crate in Cargo.lock, checked offline against the snapshot of the
# RustSec advisory database in deny/ (the build machines do not reach GitHub, where cargo-deny
# fetches it). The snapshot's commit and date are in deny/advisory-db.snapshot; the check says
# how old it is. Refresh it where GitHub is reachable:
#
#   git clone --depth 1 https://github.com/rustsec/advisory-db /tmp/advisory-db
#   git -C /tmp/advisory-db archive --format=tar HEAD crates LICENSE.txt | gzip -9n > deny/advisory-db.tar.gz
#   git -C /tmp/advisory-db log -1 --format='rustsec/advisory-db %H %cI' > deny/advisory-db.snapshot
set -euo pipefail
cd "$(dirname "$0")/.."

read -r _ commit date < deny/advisory-db.snapshot
# Where cargo-deny looks for the database of its default URL under `db-path` (deny.toml).
db=target/advisory-db/advisory-db-3157b0e258782691
if [ "$(cat "$db/.snapshot" 2>/dev/null)" != "$commit" ]; then
  rm -rf "$db"
  mkdir -p "$db"
  tar -xzf deny/advisory-db.tar.gz -C "$db"
  # cargo-deny reads the database from a git repository and its commit time.
  git -C "$db" init -q
  git -C "$db" add -A
  GIT_AUTHOR_DATE="$date" GIT_COMMITTER_DATE="$date" \
    git -C "$db" -c user.name=snapshot -c user.email=snapshot@localhost -c commit.gpgsign=false \
    commit -q -m "rustsec/advisory-db $commit"
  touch "$db/.git/FETCH_HEAD"
  echo "$commit" > "$db/.snapshot"
fi
age=$(( ($(date +%s) - $(date -d "$date" +%s)) / 86400 ))
echo "RustSec advisory database: snapshot $commit of $date ($age days old)"
cargo deny --offline check advisories
