//! Prometheus scrapes from inside a lab: `tools/scrape.py` fetches the endpoint and parses it
//! with the Prometheus project's Python client, a parser independent of the encoder under test.

use std::collections::BTreeMap;

use crate::netns::Lab;
use crate::{Run, root};

/// One parsed scrape.
#[derive(Debug, Clone)]
pub struct Scrape {
    /// The answer's `Content-Type`.
    pub content_type: String,
    /// Metric families by name (counters without `_total`, as the parser names them) and type.
    pub families: BTreeMap<String, String>,
    /// Every sample: name, labels, value, and the family it belongs to.
    pub samples: Vec<(String, BTreeMap<String, String>, f64, String)>,
}

/// Scrapes `url` from host `from` of `lab`; panics with the parser's error if it does not parse.
pub fn scrape(lab: &Lab, from: &str, url: &str) -> Scrape {
    let script = root().join("tests/tools/scrape.py").display().to_string();
    let r: Run = lab.exec(from, &["/usr/bin/python3", &script, url]).into();
    assert_eq!(r.code, Some(0), "scrape of {url} failed: {}", r.stderr);
    let v = r.json();
    let families = v["families"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, t)| (k.clone(), t.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default();
    let samples = v["samples"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    let labels = s[1]
                        .as_object()
                        .map(|m| {
                            m.iter()
                                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().into()))
                                .collect()
                        })
                        .unwrap_or_default();
                    (
                        s[0].as_str().unwrap_or_default().to_string(),
                        labels,
                        s[2].as_f64().unwrap_or(f64::NAN),
                        s[3].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    Scrape {
        content_type: v["content_type"].as_str().unwrap_or_default().into(),
        families,
        samples,
    }
}

impl Scrape {
    /// The value of sample `name` whose labels include `labels`, if there is exactly one.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut hits = self.samples.iter().filter(|(n, l, _, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(v))
        });
        let first = hits.next()?.2;
        hits.next().is_none().then_some(first)
    }

    /// Like [`Scrape::get`], 0 if absent (a counter not yet incremented).
    pub fn count(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    /// Prometheus naming conventions: the text format's content type, every counter's samples
    /// end in `_total`, histograms have buckets, sums and counts, every name is well formed.
    pub fn assert_conventions(&self) {
        assert!(
            self.content_type.starts_with("text/plain; version=0.0.4"),
            "{}",
            self.content_type
        );
        assert!(!self.samples.is_empty());
        let valid = |n: &str| {
            n.chars().enumerate().all(|(i, c)| {
                c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
            })
        };
        for (name, ty) in &self.families {
            assert!(valid(name), "bad metric name {name:?}");
            let of: Vec<&str> = self
                .samples
                .iter()
                .filter(|(_, _, _, f)| f == name)
                .map(|(n, _, _, _)| n.as_str())
                .collect();
            assert!(!of.is_empty() || ty != "histogram", "{name} has no samples");
            match ty.as_str() {
                "counter" => assert!(
                    of.iter().all(|n| *n == format!("{name}_total")),
                    "counter {name}: samples {of:?} must end in _total"
                ),
                "histogram" => {
                    for part in ["_bucket", "_sum", "_count"] {
                        assert!(
                            of.iter().any(|n| *n == format!("{name}{part}")),
                            "histogram {name} has no {part}"
                        );
                    }
                }
                "gauge" => {}
                other => panic!("{name}: unexpected type {other}"),
            }
            assert!(
                !name.ends_with("_total") || ty == "counter",
                "{name}: only counters end in _total"
            );
        }
        for (n, _, v, _) in &self.samples {
            assert!(v.is_finite(), "{n} = {v}");
        }
    }
}
