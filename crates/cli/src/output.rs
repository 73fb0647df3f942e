//! Output formats and exit codes shared by every command.

use std::io::Write;
use std::process::ExitCode;

use serde::Serialize;

/// `-o table|json|yaml`, and `html|dot` for `map`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned text for people.
    Table,
    /// One JSON document.
    Json,
    /// One YAML document.
    Yaml,
    /// One self-contained HTML page (`bulkhead map`).
    Html,
    /// Graphviz (`bulkhead map`).
    Dot,
}

/// How a command ended, as the spec's exit codes: 0 success, 1 a failed check or a denial the
/// command was asked about, 2 usage or connection errors (returned as `Err`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Exit 0.
    Ok,
    /// Exit 1.
    Failed,
}

impl Outcome {
    pub fn ok_if(ok: bool) -> Outcome {
        if ok { Outcome::Ok } else { Outcome::Failed }
    }
}

impl From<Outcome> for ExitCode {
    fn from(o: Outcome) -> ExitCode {
        match o {
            Outcome::Ok => ExitCode::SUCCESS,
            Outcome::Failed => ExitCode::from(1),
        }
    }
}

/// Prints `value` as JSON or YAML, or calls `table` for the table form.
pub fn emit<T: Serialize>(
    format: Format,
    value: &T,
    table: impl FnOnce() -> String,
) -> anyhow::Result<()> {
    let text = match format {
        Format::Table => table(),
        Format::Json => serde_json::to_string_pretty(value)? + "\n",
        Format::Yaml => serde_saphyr::to_string(value)?,
        Format::Html | Format::Dot => {
            return Err(anyhow::anyhow!(
                "-o html and -o dot are for `bulkhead map`; use table, json or yaml"
            ));
        }
    };
    print(&text)
}

/// Writes `text` to stdout. Unlike `print!`, which panics, a failed write is an error: a closed
/// pipe (`bulkhead … | head`) comes back as one, which `main` ends on quietly
/// ([`is_broken_pipe`]).
///
/// Control characters other than newlines and tabs are written escaped (`\u{1b}`): much of what
/// the CLI shows comes from nodes (statuses, versions, fact values, flow fields), and a
/// compromised node must not drive the operator's terminal with escape sequences.
pub fn print(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(escape_controls(text, true).as_bytes())?;
    out.flush()?;
    Ok(())
}

/// Whether `e` is stdout's reader having gone away: the end of the command, not a failure, as
/// for every Unix tool (which SIGPIPE ends quietly; Rust ignores SIGPIPE, so we see EPIPE).
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Lays out rows in aligned columns, two spaces apart; the last column is not padded.
pub fn columns(rows: &[Vec<String>]) -> String {
    // A cell is one line: a newline from a node would forge rows.
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            r.iter()
                .map(|c| escape_controls(c, false).into_owned())
                .collect()
        })
        .collect();
    let rows = &rows;
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0; n];
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(c);
            } else {
                line.push_str(c);
                line.extend(std::iter::repeat_n(' ', widths[i] - c.chars().count() + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `s` with control characters escaped as `\u{…}`; newlines and tabs kept if `lines`.
pub fn escape_controls(s: &str, lines: bool) -> std::borrow::Cow<'_, str> {
    let bad = |c: char| c.is_control() && !(lines && (c == '\n' || c == '\t'));
    if !s.chars().any(bad) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if bad(c) {
            out.push_str(&c.escape_unicode().to_string());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Unix seconds as RFC 3339.
pub fn time(t: i64) -> String {
    jiff::Timestamp::from_second(t).map_or_else(|_| t.to_string(), |ts| ts.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_nodes_say_cannot_drive_the_terminal() {
        let evil = "ok\u{1b}]0;pwned\u{7}\u{1b}[2J";
        let shown = escape_controls(evil, true);
        assert!(
            !shown.contains('\u{1b}') && !shown.contains('\u{7}'),
            "{shown}"
        );
        assert!(shown.contains("\\u{1b}"), "visible: {shown}");
        assert_eq!(escape_controls("a\tb\n", true), "a\tb\n");
        let table = columns(&[vec!["x".into(), "line\nforged  row".into()]]);
        assert_eq!(table.lines().count(), 1, "{table}");
    }

    #[test]
    fn columns_align() {
        let rows = vec![
            vec!["a".to_string(), "bb".into(), "c".into()],
            vec!["ddd".to_string(), "e".into(), "f".into()],
        ];
        assert_eq!(columns(&rows), "a    bb  c\nddd  e   f\n");
    }

    #[test]
    fn a_broken_pipe_is_recognised_through_context() {
        let e = anyhow::Error::from(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
            .context("writing the table");
        assert!(is_broken_pipe(&e));
        assert!(!is_broken_pipe(&anyhow::anyhow!("cannot read p.yaml")));
    }

    #[test]
    fn times() {
        assert_eq!(time(0), "1970-01-01T00:00:00Z");
    }
}
