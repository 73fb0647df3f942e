//! Adding items to a policy's text where they belong, keeping everything else as written:
//! comments, order, style. `bulkhead policy suggest --full` puts its segments, rules and
//! underlay entries into the base this way.
//!
//! Items go at the end of the block they belong to (`segments`, `rules`, `underlay.allow`),
//! indented like the block's first item; a block the file lacks is added at the end (for
//! `allow`, at the end of the `underlay` block). A block written in flow style on one line
//! (`rules: [...]`) is rewritten in block style only when empty, or, for `underlay`, when it
//! holds nothing but scalars and flow lists (`underlay: { mode: observe, scope: [prod] }`);
//! otherwise the splice is refused and the items must be pasted by hand.

use crate::yaml::{self, Node, Value};

/// Where items go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Block {
    /// `segments` (a mapping).
    Segments,
    /// `rules` (a list).
    Rules,
    /// `underlay.allow` (a list).
    UnderlayAllow,
}

/// `text` with each block's items added; each item is lines of YAML written from column 0.
/// `marker` (a comment line) goes before the items of each block.
pub fn splice(
    text: &str,
    items: &[(Block, Vec<Vec<String>>)],
    marker: &str,
) -> Result<String, String> {
    let root = yaml::parse(text).map_err(|d| d.message)?;
    let Value::Map(top) = &root.value else {
        return Err("the policy is not a mapping".into());
    };
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    // Edits as (line index to insert after, or replace, lines), applied bottom-up.
    let mut edits: Vec<Edit> = Vec::new();
    for (block, its) in items {
        if its.is_empty() {
            continue;
        }
        let mut body: Vec<String> = vec![marker.to_string()];
        body.extend(its.iter().flatten().cloned());
        let edit = match block {
            Block::Segments => place(&lines, top, "segments", None, &body, 0)?,
            Block::Rules => place(&lines, top, "rules", None, &body, 0)?,
            Block::UnderlayAllow => underlay_allow(&lines, top, &body)?,
        };
        edits.push(edit);
    }
    // Bottom-up; at one line, insertions after it before replacing it, and later items first,
    // so that each lands after the ones before it.
    let mut edits: Vec<(usize, Edit)> = edits.into_iter().enumerate().collect();
    edits.sort_by_key(|(i, e)| (std::cmp::Reverse(e.at), e.replace, std::cmp::Reverse(*i)));
    for (_, e) in edits {
        let at = e.at.min(lines.len());
        if e.replace {
            lines.splice(at - 1..at, e.lines);
        } else {
            lines.splice(at..at, e.lines);
        }
    }
    Ok(lines.join("\n") + "\n")
}

/// Lines to insert after line `at` (1-based; 0 = at the top), or to put in place of line `at`.
#[derive(Debug)]
struct Edit {
    at: usize,
    replace: bool,
    lines: Vec<String>,
}

fn indent(n: usize, body: &[String]) -> Vec<String> {
    body.iter()
        .map(|l| format!("{}{l}", " ".repeat(n)))
        .collect()
}

/// The last line of the block of entry `i` of `entries`, whose next sibling (if any) starts
/// the next block; `limit` is the last line of the enclosing block. Blank and comment lines
/// at its end belong to what follows.
fn block_end(lines: &[String], entries: &[(Node, Node)], i: usize, limit: usize) -> usize {
    let start = entries[i].0.pos.line as usize;
    let mut end = entries
        .get(i + 1)
        .map_or(limit, |(k, _)| (k.pos.line as usize).saturating_sub(1));
    while end > start {
        let l = lines[end - 1].trim();
        if l.is_empty() || l.starts_with('#') {
            end -= 1;
        } else {
            break;
        }
    }
    end
}

/// Places `body` at the end of the block of `key` among `entries` (a mapping whose keys sit at
/// column `key_indent`), or after the mapping's last block (ending at `limit`, default the end
/// of the text) if the key is missing.
fn place(
    lines: &[String],
    entries: &[(Node, Node)],
    key: &str,
    limit: Option<usize>,
    body: &[String],
    key_indent: usize,
) -> Result<Edit, String> {
    let limit = limit.unwrap_or(lines.len());
    let Some(i) = entries.iter().position(|(k, _)| k.as_str() == Some(key)) else {
        let end = match entries.len() {
            0 => limit,
            n => block_end(lines, entries, n - 1, limit),
        };
        let mut new = vec![format!("{}{key}:", " ".repeat(key_indent))];
        new.extend(indent(key_indent + 2, body));
        return Ok(Edit {
            at: end,
            replace: false,
            lines: new,
        });
    };
    let (k, v) = &entries[i];
    let key_line = k.pos.line as usize;
    let flow = v.pos.line == k.pos.line;
    match &v.value {
        Value::Null => Ok(Edit {
            at: key_line,
            replace: false,
            lines: indent(key_indent + 2, body),
        }),
        Value::Seq(items) if flow && items.is_empty() => {
            Ok(empty_flow(key, key_indent, key_line, body))
        }
        Value::Map(items) if flow && items.is_empty() => {
            Ok(empty_flow(key, key_indent, key_line, body))
        }
        Value::Seq(_) | Value::Map(_) if flow => Err(format!(
            "`{key}` is written on one line (flow style): write it as a block to add to it"
        )),
        Value::Seq(_) | Value::Map(_) => Ok(Edit {
            at: block_end(lines, entries, i, limit),
            replace: false,
            lines: indent(v.pos.col.saturating_sub(1) as usize, body),
        }),
        Value::Scalar { .. } => Err(format!("`{key}` is not a list or a mapping")),
    }
}

fn empty_flow(key: &str, key_indent: usize, key_line: usize, body: &[String]) -> Edit {
    let mut new = vec![format!("{}{key}:", " ".repeat(key_indent))];
    new.extend(indent(key_indent + 2, body));
    Edit {
        at: key_line,
        replace: true,
        lines: new,
    }
}

/// `underlay.allow`: in the `underlay` block, which must exist (without it nothing is
/// filtered, so there is nothing to allow).
fn underlay_allow(lines: &[String], top: &[(Node, Node)], body: &[String]) -> Result<Edit, String> {
    let i = top
        .iter()
        .position(|(k, _)| k.as_str() == Some("underlay"))
        .ok_or("the policy has no `underlay` block to add entries to")?;
    let (k, v) = &top[i];
    let Value::Map(entries) = &v.value else {
        return Err("`underlay` is not a mapping".into());
    };
    let key_line = k.pos.line as usize;
    if v.pos.line == k.pos.line {
        // `underlay: { mode: observe, scope: [prod] }`: rewritten as a block.
        let mut new = vec![format!("{}underlay:", " ".repeat(k.pos.col as usize - 1))];
        let inner = k.pos.col as usize + 1;
        for (ek, ev) in entries {
            let key = ek.as_str().ok_or("`underlay` has a key that is not text")?;
            let value = match &ev.value {
                Value::Scalar { .. } => flow_scalar(ev),
                Value::Seq(items) if items.iter().all(|n| n.as_str().is_some()) => format!(
                    "[{}]",
                    items.iter().map(flow_scalar).collect::<Vec<_>>().join(", ")
                ),
                Value::Seq(items) if key == "allow" && items.is_empty() => continue,
                _ => {
                    return Err(
                        "`underlay` is written on one line with entries: write it as a block to \
                         add to it"
                            .into(),
                    );
                }
            };
            new.push(format!("{}{key}: {value}", " ".repeat(inner)));
        }
        new.push(format!("{}allow:", " ".repeat(inner)));
        new.extend(indent(inner + 2, body));
        if lines
            .get(key_line - 1)
            .is_some_and(|l| l.matches('{').count() != l.matches('}').count())
        {
            return Err("`underlay` spans several lines in flow style: write it as a block".into());
        }
        return Ok(Edit {
            at: key_line,
            replace: true,
            lines: new,
        });
    }
    let limit = block_end(lines, top, i, lines.len());
    let key_indent = v.pos.col.saturating_sub(1) as usize;
    place(lines, entries, "allow", Some(limit), body, key_indent)
}

/// A scalar as it can be written again in a flow collection.
fn flow_scalar(n: &Node) -> String {
    match &n.value {
        Value::Scalar {
            text,
            quoted: false,
        } => text.clone(),
        Value::Scalar { text, .. } => format!("{text:?}"),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(v: &[&[&str]]) -> Vec<Vec<String>> {
        v.iter()
            .map(|it| it.iter().map(|s| s.to_string()).collect())
            .collect()
    }

    const RULE: &[&str] = &[
        "- name: new",
        "  from: [a]",
        "  to: [b]",
        "  ports: [tcp/1]",
    ];

    #[test]
    fn items_go_to_the_end_of_their_block_with_its_indentation() {
        let text = "version: 1\n# the rules\nrules:\n    - { name: old, from: [a], to: [b], ports: [tcp/2] }\n\n# after\ntests: []\n";
        let out = splice(text, &[(Block::Rules, items(&[RULE]))], "# added").unwrap_or_default();
        assert_eq!(
            out,
            "version: 1\n# the rules\nrules:\n    - { name: old, from: [a], to: [b], ports: [tcp/2] }\n    # added\n    - name: new\n      from: [a]\n      to: [b]\n      ports: [tcp/1]\n\n# after\ntests: []\n"
        );
    }

    #[test]
    fn missing_and_empty_blocks_are_written() {
        let text = "version: 1\nrules: []\n";
        let seg = &["web:", "  match: { app: web }"][..];
        let out = splice(
            text,
            &[
                (Block::Rules, items(&[RULE])),
                (Block::Segments, items(&[seg])),
            ],
            "# added",
        )
        .unwrap_or_default();
        assert_eq!(
            out,
            "version: 1\nrules:\n  # added\n  - name: new\n    from: [a]\n    to: [b]\n    ports: [tcp/1]\nsegments:\n  # added\n  web:\n    match: { app: web }\n"
        );
    }

    #[test]
    fn underlay_entries_go_into_the_block_or_make_it_a_block() {
        let entry = &["- name: e", "  from: [a]", "  to: [b]", "  ports: [tcp/22]"][..];
        let text = "underlay:\n  mode: observe\n  allow:\n    - { name: x, from: [a], to: [b], ports: [tcp/1] }\nrules: []\n";
        let out =
            splice(text, &[(Block::UnderlayAllow, items(&[entry]))], "# added").unwrap_or_default();
        assert!(
            out.starts_with("underlay:\n  mode: observe\n  allow:\n    - { name: x, from: [a], to: [b], ports: [tcp/1] }\n    # added\n    - name: e\n"),
            "{out}"
        );
        let text = "underlay:\n  mode: observe\nrules: []\n";
        let out =
            splice(text, &[(Block::UnderlayAllow, items(&[entry]))], "# added").unwrap_or_default();
        assert!(
            out.starts_with("underlay:\n  mode: observe\n  allow:\n    # added\n    - name: e\n"),
            "{out}"
        );
        let text = "underlay: { mode: observe, scope: [prod, \"db\"] }\nrules: []\n";
        let out =
            splice(text, &[(Block::UnderlayAllow, items(&[entry]))], "# added").unwrap_or_default();
        assert!(
            out.starts_with("underlay:\n  mode: observe\n  scope: [prod, \"db\"]\n  allow:\n    # added\n    - name: e\n"),
            "{out}"
        );
        assert!(
            splice(
                "rules: []\n",
                &[(Block::UnderlayAllow, items(&[entry]))],
                "#"
            )
            .is_err()
        );
        assert!(
            splice(
                "rules: [{ name: a }]\n",
                &[(Block::Rules, items(&[RULE]))],
                "#"
            )
            .is_err()
        );
    }
}
