//! A YAML document as a tree that remembers where every node came from.
//!
//! Built from `saphyr-parser`'s event stream rather than through serde, so that the reader can
//! see duplicate keys, keep every position, and go on after a problem to report the next one.
//!
//! Aliases are expanded into copies, so the tree is bounded as it is built: a "billion laughs"
//! (aliases of aliases of lists, each multiplying the one before) would otherwise take a few
//! hundred bytes of text to exhaust memory. Every node counts, copies included
//! ([`MAX_NODES`]), and no node lies deeper than [`MAX_DEPTH`] (which also keeps the recursive
//! drop and clone of the tree off the end of the stack).

use saphyr_parser::{Event, Marker, Parser, ScalarStyle};

use crate::diag::{Diagnostic, Pos};

/// A node of the document.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Node {
    pub(crate) pos: Pos,
    pub(crate) value: Value,
}

/// What a node holds.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    /// `null`, `~` or nothing.
    Null,
    /// A scalar's text; `quoted` if it was written in quotes or as a block.
    Scalar {
        text: String,
        quoted: bool,
    },
    Seq(Vec<Node>),
    /// Entries in document order, repeats included.
    Map(Vec<(Node, Node)>),
}

impl Node {
    /// A short name of the node's kind, for messages.
    pub(crate) fn kind(&self) -> &'static str {
        match &self.value {
            Value::Null => "nothing",
            Value::Scalar { .. } => "a scalar",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }

    /// The scalar's text, if this is a scalar.
    pub(crate) fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }
}

/// The most bytes a policy may have. A policy of 5,000 identities with labels, and their
/// rules, is about 400 KiB.
pub const MAX_BYTES: usize = 8 << 20;

/// The most nodes a document may hold, counting every copy that anchors and aliases make. A
/// policy of 5,000 identities with labels, and their rules, holds about 50,000.
pub const MAX_NODES: usize = 1_000_000;

/// The deepest a node may lie, the document's top mapping being at depth 1. A policy needs 6.
pub const MAX_DEPTH: usize = 64;

fn pos(m: &Marker) -> Pos {
    let clamp = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    Pos::new(clamp(m.line()), clamp(m.col() + 1))
}

enum Frame {
    Seq {
        pos: Pos,
        anchor: usize,
        size: Size,
        items: Vec<Node>,
    },
    Map {
        pos: Pos,
        anchor: usize,
        size: Size,
        entries: Vec<(Node, Node)>,
        key: Option<Node>,
    },
}

/// How big a subtree is: its nodes, copies included, and its height (a scalar's is 1). While
/// a collection is open, `height` is its tallest child's.
#[derive(Debug, Clone, Copy)]
struct Size {
    nodes: usize,
    height: usize,
}

impl Size {
    const ONE: Size = Size {
        nodes: 1,
        height: 1,
    };

    /// Takes in a child of an open collection.
    fn grow(&mut self, child: Size) {
        self.nodes = self.nodes.saturating_add(child.nodes);
        self.height = self.height.max(child.height);
    }
}

/// The line and column of byte `at` (or of the character it falls in).
fn position_of(text: &str, mut at: usize) -> Pos {
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let before = &text[..at];
    let line = before.bytes().filter(|&b| b == b'\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    let clamp = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    Pos::new(clamp(line), clamp(col))
}

fn too_many(at: Pos) -> Diagnostic {
    Diagnostic::error(
        at,
        format!(
            "the policy holds more than {MAX_NODES} YAML values here, the most it may \
             (aliases count as copies, and aliases of aliases multiply)"
        ),
    )
}

fn too_deep(at: Pos) -> Diagnostic {
    Diagnostic::error(
        at,
        format!("values nest more than {MAX_DEPTH} levels deep here, the most a policy may"),
    )
}

/// Parses one YAML document. A syntax error ends parsing, since nothing after it can be trusted,
/// and so does going past [`MAX_NODES`] or [`MAX_DEPTH`].
pub(crate) fn parse(text: &str) -> Result<Node, Diagnostic> {
    if text.len() > MAX_BYTES {
        return Err(Diagnostic::error(
            position_of(text, MAX_BYTES),
            format!(
                "the policy is larger than {} MiB, the most a policy may be",
                MAX_BYTES >> 20
            ),
        ));
    }
    let mut parser = Parser::new_from_str(text);
    let mut stack: Vec<Frame> = Vec::new();
    let mut anchors: std::collections::HashMap<usize, (Node, Size)> = Default::default();
    let mut root: Option<Node> = None;
    let mut documents = 0;
    // Every node so far, copies included.
    let mut nodes: usize = 0;

    while let Some(ev) = parser.next_event() {
        let (event, span) = ev.map_err(|e| {
            Diagnostic::error(pos(e.marker()), format!("invalid YAML: {}", e.info()))
        })?;
        let at = pos(&span.start);
        let done = match event {
            Event::StreamStart | Event::DocumentEnd | Event::Nothing => None,
            Event::StreamEnd => break,
            Event::DocumentStart(_) => {
                documents += 1;
                if documents > 1 {
                    return Err(Diagnostic::error(
                        at,
                        "a policy file holds one YAML document, found a second",
                    ));
                }
                None
            }
            Event::Alias(id) => {
                let Some((n, size)) = anchors.get(&id) else {
                    return Err(Diagnostic::error(at, "alias to an unknown anchor"));
                };
                // Checked before the copy is made: the copy is what would exhaust memory.
                nodes = nodes.saturating_add(size.nodes);
                if nodes > MAX_NODES {
                    return Err(too_many(at));
                }
                if stack.len() + size.height > MAX_DEPTH {
                    return Err(too_deep(at));
                }
                let node = Node {
                    pos: at,
                    value: n.value.clone(),
                };
                Some((node, 0, *size))
            }
            Event::Scalar(text, style, anchor, _tag) => {
                nodes += 1;
                if nodes > MAX_NODES {
                    return Err(too_many(at));
                }
                if stack.len() + 1 > MAX_DEPTH {
                    return Err(too_deep(at));
                }
                let quoted = !matches!(style, ScalarStyle::Plain);
                let value = if !quoted && matches!(&*text, "" | "~" | "null" | "Null" | "NULL") {
                    Value::Null
                } else {
                    Value::Scalar {
                        text: text.into_owned(),
                        quoted,
                    }
                };
                Some((Node { pos: at, value }, anchor, Size::ONE))
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                nodes += 1;
                if nodes > MAX_NODES {
                    return Err(too_many(at));
                }
                if stack.len() + 1 > MAX_DEPTH {
                    return Err(too_deep(at));
                }
                let size = Size {
                    nodes: 1,
                    height: 0,
                };
                stack.push(if matches!(event, Event::SequenceStart(..)) {
                    Frame::Seq {
                        pos: at,
                        anchor,
                        size,
                        items: Vec::new(),
                    }
                } else {
                    Frame::Map {
                        pos: at,
                        anchor,
                        size,
                        entries: Vec::new(),
                        key: None,
                    }
                });
                None
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let (pos, anchor, size, value) = match stack.pop() {
                    Some(Frame::Seq {
                        pos,
                        anchor,
                        size,
                        items,
                    }) => (pos, anchor, size, Value::Seq(items)),
                    Some(Frame::Map {
                        pos,
                        anchor,
                        size,
                        entries,
                        ..
                    }) => (pos, anchor, size, Value::Map(entries)),
                    None => {
                        return Err(Diagnostic::error(at, "invalid YAML: unbalanced collection"));
                    }
                };
                let size = Size {
                    nodes: size.nodes,
                    height: size.height + 1,
                };
                Some((Node { pos, value }, anchor, size))
            }
        };
        let Some((node, anchor, size)) = done else {
            continue;
        };
        if anchor != 0 {
            // The anchor keeps a copy too, and anchors nest: count it like any other copy.
            nodes = nodes.saturating_add(size.nodes);
            if nodes > MAX_NODES {
                return Err(too_many(node.pos));
            }
            anchors.insert(anchor, (node.clone(), size));
        }
        match stack.last_mut() {
            None => root = Some(node),
            Some(Frame::Seq {
                items, size: outer, ..
            }) => {
                outer.grow(size);
                items.push(node);
            }
            Some(Frame::Map {
                entries,
                key,
                size: outer,
                ..
            }) => {
                outer.grow(size);
                match key.take() {
                    None => *key = Some(node),
                    Some(k) => entries.push((k, node)),
                }
            }
        }
    }
    Ok(root.unwrap_or(Node {
        pos: Pos::new(1, 1),
        value: Value::Null,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scalar(n: &Node) -> &str {
        n.as_str().expect("scalar")
    }

    #[test]
    fn positions_are_one_based() {
        let n = parse("a: 1\nb:\n  - x\n  - 'y'\n").unwrap();
        let Value::Map(entries) = &n.value else {
            panic!("map")
        };
        assert_eq!(entries[0].0.pos, Pos::new(1, 1));
        assert_eq!(entries[0].1.pos, Pos::new(1, 4));
        assert_eq!(entries[1].0.pos, Pos::new(2, 1));
        let Value::Seq(items) = &entries[1].1.value else {
            panic!("seq")
        };
        assert_eq!(items[0].pos, Pos::new(3, 5));
        assert_eq!(scalar(&items[1]), "y");
        assert!(matches!(items[1].value, Value::Scalar { quoted: true, .. }));
    }

    #[test]
    fn duplicate_keys_are_kept_for_the_reader_to_report() {
        let n = parse("a: 1\na: 2\n").unwrap();
        let Value::Map(entries) = &n.value else {
            panic!("map")
        };
        assert_eq!(entries.len(), 2);
    }

    #[test]
    fn nulls_and_aliases() {
        let n = parse("a:\nb: ~\nc: &x [1]\nd: *x\ne: 'null'\n").unwrap();
        let Value::Map(e) = &n.value else {
            panic!("map")
        };
        assert_eq!(e[0].1.value, Value::Null);
        assert_eq!(e[1].1.value, Value::Null);
        assert_eq!(e[2].1.value, e[3].1.value);
        assert_eq!(scalar(&e[4].1), "null");
    }

    #[test]
    fn syntax_errors_have_a_position() {
        let e = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(e.message.starts_with("invalid YAML"), "{}", e.message);
        assert!(e.pos.line >= 1);
        let e = parse("a: 1\n---\nb: 2\n").unwrap_err();
        assert_eq!(e.pos.line, 2);
    }

    /// A "billion laughs": each list holds nine aliases of the one before.
    pub(crate) fn bomb(levels: usize) -> String {
        let mut s = "a0: &a0 [x, x, x, x, x, x, x, x, x]\n".to_string();
        for i in 1..levels {
            let p = i - 1;
            s += &format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            );
        }
        s
    }

    #[test]
    fn alias_bombs_are_refused_before_they_grow() {
        let started = std::time::Instant::now();
        let e = parse(&bomb(9)).unwrap_err();
        assert!(
            e.message.contains("more than 1000000 YAML values"),
            "{}",
            e.message
        );
        // a5 holds about 600,000 values, counted twice (its anchor keeps a copy): refused there.
        assert_eq!(e.pos.line, 6);
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        // A few levels are fine.
        assert!(parse(&bomb(3)).is_ok());
    }

    #[test]
    fn nested_anchors_count_their_copies() {
        // Each anchor keeps a copy of everything inside it, so nesting 40 anchors around one
        // list of 30,000 values copies it 40 times.
        let list = vec!["x"; 30_000].join(", ");
        let mut s = String::new();
        for i in 0..40 {
            s += &format!("{}- &n{i}\n", "  ".repeat(i));
        }
        s += &format!("{}- [{list}]\n", "  ".repeat(40));
        let e = parse(&s).unwrap_err();
        assert!(e.message.contains("more than 1000000"), "{}", e.message);
    }

    #[test]
    fn depth_is_bounded_also_through_aliases() {
        let deep = "[".repeat(MAX_DEPTH + 1) + &"]".repeat(MAX_DEPTH + 1);
        let e = parse(&deep).unwrap_err();
        assert!(e.message.contains("nest more than 64"), "{}", e.message);
        assert_eq!(e.pos, Pos::new(1, MAX_DEPTH as u32 + 1));
        let ok = "[".repeat(MAX_DEPTH) + &"]".repeat(MAX_DEPTH);
        assert!(parse(&ok).is_ok());
        // Block nesting has no limit in the YAML parser itself.
        let mut s = String::new();
        for i in 0..=MAX_DEPTH {
            s += &format!("{}- \n", "  ".repeat(i));
        }
        assert!(parse(&s).is_err());
        // Each anchor is shallow, but aliases stack them.
        let half = MAX_DEPTH / 2 + 1;
        let a = "[".repeat(half) + &"]".repeat(half);
        let s = format!(
            "a: &a {a}\nb: [{}*a{}]\n",
            "[".repeat(half),
            "]".repeat(half)
        );
        let e = parse(&s).unwrap_err();
        assert!(e.message.contains("nest more than"), "{}", e.message);
    }

    #[test]
    fn size_is_bounded_with_a_position() {
        let line = "# padding\n";
        let text = line.repeat(MAX_BYTES / line.len() + 1);
        let e = parse(&text).unwrap_err();
        assert!(e.message.contains("larger than 8 MiB"), "{}", e.message);
        assert_eq!(e.pos.line as usize, MAX_BYTES / line.len() + 1);
        assert_eq!(position_of("ab\ncé\n", 6), Pos::new(2, 3));
        assert_eq!(position_of("ab\ncé\n", 5), Pos::new(2, 2));
    }

    #[test]
    fn empty_document_is_null() {
        assert_eq!(parse("").unwrap().value, Value::Null);
        assert_eq!(parse("# only a comment\n").unwrap().value, Value::Null);
    }
}
