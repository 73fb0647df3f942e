#!/usr/bin/python3
"""Scrapes a Prometheus endpoint and parses it with the Prometheus project's own Python client
(Debian's python3-prometheus-client): a parser independent of the Rust encoder under test.

Usage: scrape.py URL
Prints one JSON object: {"content_type": ..., "families": {name: type},
"samples": [[name, {label: value}, value, family], ...]}. Exits 1 if the fetch or the parse fails.
Never uses a proxy: the URL is always a lab namespace's address.
"""
import json
import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def main() -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(sys.argv[1], timeout=5) as r:
            content_type = r.headers.get("Content-Type", "")
            text = r.read().decode("utf-8")
        families = {}
        samples = []
        for f in text_string_to_metric_families(text):
            families[f.name] = f.type
            for s in f.samples:
                samples.append([s.name, s.labels, s.value, f.name])
    except Exception as e:  # the test prints it
        print(f"scrape {sys.argv[1]}: {e!r}", file=sys.stderr)
        return 1
    print(json.dumps({"content_type": content_type, "families": families, "samples": samples}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
