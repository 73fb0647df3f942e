//! The map as Graphviz, as a listing, and as one HTML page that works offline: the SVG drawn
//! here, a stylesheet and a small script inline, nothing fetched (no fonts, no scripts, no
//! images from anywhere).
//!
//! The page: one box per group with its members; a group of more than [`COLLAPSE_ABOVE`]
//! starts collapsed into one small box, and clicking a group's header collapses or expands it.
//! An edge to a member of a collapsed group ends at the group's box; between two collapsed
//! groups the edges give way to one edge per verdict and path with their flows added up. Every
//! edge has a tooltip (ports, counts, rules), and the table under the drawing lists them all.
//! What a test or a script needs is in the DOM: `g.group[data-group]`, `g.node[data-identity]`,
//! `g.edge[data-from][data-to][data-verdict][data-path][data-ports][data-count][data-rules]`,
//! and `body[data-ready]` once the script has run.

use std::collections::HashMap;
use std::fmt::Write;

use bulkhead_policy::observed::{Seen, Way};

use super::layout::{self, COLLAPSED_H, COLLAPSED_W, Frame, Layout};
use super::{Edge, Map};
use crate::output::columns;

/// Groups larger than this start collapsed.
pub const COLLAPSE_ABOVE: usize = 8;

fn colour(v: Seen) -> &'static str {
    match v {
        Seen::Allow => "#2e7d32",
        Seen::Deny => "#c62828",
        Seen::WouldDeny => "#ef6c00",
    }
}

/// Text for HTML and SVG.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() => {
                let _ = write!(out, "&#{};", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// A quoted Graphviz ID.
fn dot_id(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out + "\""
}

/// `-o dot`: one cluster per group, one edge per initiator, responder, verdict and path.
pub fn dot(map: &Map) -> String {
    let mut s = String::from(
        "digraph bulkhead {\n  rankdir=LR;\n  compound=true;\n  node [shape=box, style=rounded, fontname=\"sans-serif\", fontsize=10];\n  edge [fontname=\"sans-serif\", fontsize=9];\n",
    );
    for (i, g) in map.groups.iter().enumerate() {
        let _ = writeln!(
            s,
            "  subgraph \"cluster_{i}\" {{\n    label={};\n    style=rounded;",
            dot_id(&g.name)
        );
        for m in &g.members {
            let _ = writeln!(s, "    {};", dot_id(m));
        }
        s += "  }\n";
    }
    for e in &map.edges {
        let style = match (e.verdict, e.path) {
            (Seen::WouldDeny, _) => "dashed",
            (_, Way::Underlay) => "dotted",
            _ => "solid",
        };
        let _ = writeln!(
            s,
            "  {} -> {} [label={}, color=\"{}\", fontcolor=\"{}\", style={style}, tooltip={}];",
            dot_id(&e.from),
            dot_id(&e.to),
            dot_id(&format!("{} {}", e.verdict, e.label())),
            colour(e.verdict),
            colour(e.verdict),
            dot_id(&format!("{} -> {} over the {}", e.from, e.to, e.path)),
        );
    }
    s + "}\n"
}

/// `-o table`: the groups, then every edge.
pub fn table(map: &Map) -> String {
    let mut s = format!(
        "{} identities in {} groups, {} edges (policy: {}, flows: {})\n\n",
        map.identities.len(),
        map.groups.len(),
        map.edges.len(),
        map.policy.as_deref().unwrap_or("none"),
        map.history
    );
    let mut rows = vec![vec!["GROUP".to_string(), "MEMBERS".into()]];
    for g in &map.groups {
        rows.push(vec![g.name.clone(), g.members.join(", ")]);
    }
    s += &columns(&rows);
    s += "\n";
    let mut rows = vec![
        ["FROM", "TO", "VERDICT", "PATH", "FLOWS", "PORTS (RULES)"]
            .map(String::from)
            .to_vec(),
    ];
    for e in &map.edges {
        rows.push(vec![
            format!("{} [{}]", e.from, e.from_group),
            format!("{} [{}]", e.to, e.to_group),
            e.verdict.to_string(),
            e.path.to_string(),
            e.count.to_string(),
            e.label(),
        ]);
    }
    s + &columns(&rows)
}

/// The drawing's state: which groups are collapsed, where everything is.
struct Scene<'a> {
    map: &'a Map,
    layout: Layout,
    group_index: HashMap<&'a str, usize>,
    node_point: HashMap<&'a str, (f64, f64)>,
}

impl<'a> Scene<'a> {
    fn new(map: &'a Map) -> Scene<'a> {
        let sizes: Vec<usize> = map.groups.iter().map(|g| g.members.len()).collect();
        let layout = layout::layout(&sizes);
        let mut node_point = HashMap::new();
        let mut group_index = HashMap::new();
        for (gi, g) in map.groups.iter().enumerate() {
            group_index.insert(g.name.as_str(), gi);
            for (mi, m) in g.members.iter().enumerate() {
                node_point.insert(m.as_str(), layout.points[gi][mi]);
            }
        }
        Scene {
            map,
            layout,
            group_index,
            node_point,
        }
    }

    fn frame(&self, group: &str) -> Frame {
        self.layout.frames[self.group_index[group]]
    }

    fn collapsed(&self, group: &str) -> bool {
        self.map.groups[self.group_index[group]].members.len() > COLLAPSE_ABOVE
    }

    /// Where an edge to `identity` of `group` ends now.
    fn end(&self, identity: &str, group: &str) -> (f64, f64) {
        match self.node_point.get(identity) {
            Some(&p) if !self.collapsed(group) => p,
            _ => self.frame(group).collapsed_centre(),
        }
    }
}

fn f(x: f64) -> String {
    format!("{x:.1}")
}

/// `-o html`: one page, self-contained.
pub fn html(map: &Map) -> String {
    let sc = Scene::new(map);
    let (w, h) = (sc.layout.width, sc.layout.height);
    let mut s = String::with_capacity(4096 + map.edges.len() * 600);
    s += "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n";
    s += "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n";
    s += "<title>Bulkhead map</title>\n<style>\n";
    s += STYLE;
    s += "</style>\n</head>\n<body>\n<h1>Who talks to whom</h1>\n";
    let _ = writeln!(
        s,
        "<p class=\"meta\">{} identities in {} groups, {} edges. Policy: {}. Flows: {}. Click a group's name to collapse or expand it; hover over an edge for its ports, counts and rules.</p>",
        map.identities.len(),
        map.groups.len(),
        map.edges.len(),
        esc(map.policy.as_deref().unwrap_or("none")),
        esc(&map.history)
    );
    s += "<p class=\"legend\"><span class=\"k allow\">allowed</span> <span class=\"k deny\">denied</span> <span class=\"k would-deny\">would-deny</span> <span class=\"k underlay\">underlay (dotted)</span></p>\n";
    let _ = writeln!(
        s,
        "<svg id=\"map\" width=\"{}\" height=\"{}\" viewBox=\"0 0 {} {}\" role=\"img\" aria-label=\"map of flows\">",
        f(w),
        f(h),
        f(w),
        f(h)
    );
    s += "<defs>\n";
    for v in [Seen::Allow, Seen::Deny, Seen::WouldDeny] {
        let _ = writeln!(
            s,
            "<marker id=\"arrow-{v}\" viewBox=\"0 0 10 10\" refX=\"9\" refY=\"5\" markerWidth=\"7\" markerHeight=\"7\" orient=\"auto-start-reverse\"><path d=\"M0,0 L10,5 L0,10 z\" fill=\"{}\"/></marker>",
            colour(v)
        );
    }
    s += "</defs>\n<g id=\"groups\">\n";
    for (gi, g) in map.groups.iter().enumerate() {
        let fr = sc.layout.frames[gi];
        let collapsed = sc.collapsed(&g.name);
        let (cx, cy) = fr.collapsed_centre();
        let hide = |on: bool| if on { " style=\"display:none\"" } else { "" };
        let _ = writeln!(
            s,
            "<g class=\"group {}\" id=\"group-{}\" data-group=\"{}\" data-kind=\"{}\" data-size=\"{}\" data-collapsed=\"{collapsed}\" data-cx=\"{}\" data-cy=\"{}\">",
            g.kind,
            esc(&g.name),
            esc(&g.name),
            g.kind,
            g.members.len(),
            f(cx),
            f(cy)
        );
        let _ = writeln!(
            s,
            "<rect class=\"box\" x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" rx=\"8\"{}/>",
            f(fr.x),
            f(fr.y),
            f(fr.w),
            f(fr.h),
            hide(collapsed)
        );
        let _ = writeln!(
            s,
            "<g class=\"collapsed-box\"{}><rect x=\"{}\" y=\"{}\" width=\"{COLLAPSED_W}\" height=\"{COLLAPSED_H}\" rx=\"8\"/><text x=\"{}\" y=\"{}\" class=\"count\">{} identities</text></g>",
            hide(!collapsed),
            f(fr.x),
            f(fr.y),
            f(fr.x + 10.0),
            f(fr.y + 44.0),
            g.members.len()
        );
        let _ = writeln!(
            s,
            "<text class=\"toggle\" x=\"{}\" y=\"{}\"><tspan class=\"sign\">{}</tspan> {}</text>",
            f(fr.x + 10.0),
            f(fr.y + 21.0),
            if collapsed { "+" } else { "−" },
            esc(&g.name)
        );
        let _ = writeln!(s, "<g class=\"members\"{}>", hide(collapsed));
        for (mi, m) in g.members.iter().enumerate() {
            let (x, y) = sc.layout.points[gi][mi];
            let node = map.identities.iter().find(|n| &n.name == m);
            let addr = node.and_then(|n| n.address.as_deref()).unwrap_or("");
            let _ = writeln!(
                s,
                "<g class=\"node\" id=\"node-{}\" data-identity=\"{}\" data-group=\"{}\" data-x=\"{}\" data-y=\"{}\"><circle cx=\"{}\" cy=\"{}\" r=\"6\"/><text x=\"{}\" y=\"{}\">{}</text><title>{} {}</title></g>",
                esc(m),
                esc(m),
                esc(&g.name),
                f(x),
                f(y),
                f(x),
                f(y),
                f(x + 12.0),
                f(y + 4.0),
                esc(m),
                esc(m),
                esc(addr)
            );
        }
        s += "</g>\n</g>\n";
    }
    s += "</g>\n<g id=\"edges\">\n";
    for e in &map.edges {
        s += &edge(&sc, e);
    }
    s += "</g>\n<g id=\"group-edges\">\n";
    for ge in &map.group_edges {
        let a = sc.frame(&ge.from).collapsed_centre();
        let b = sc.frame(&ge.to).collapsed_centre();
        let (d, (mx, my)) = layout::curve(a, b, 30.0);
        let shown = sc.collapsed(&ge.from) && sc.collapsed(&ge.to);
        let dash = if ge.path == Way::Underlay {
            " stroke-dasharray=\"2 4\""
        } else if ge.verdict == Seen::WouldDeny {
            " stroke-dasharray=\"8 4\""
        } else {
            ""
        };
        let label = format!("{} ×{} ({} pairs)", ge.ports.join(", "), ge.count, ge.pairs);
        let _ = writeln!(
            s,
            "<g class=\"gedge {}\" data-from-group=\"{}\" data-to-group=\"{}\" data-verdict=\"{}\" data-path=\"{}\" data-count=\"{}\"{}><path d=\"{d}\" fill=\"none\" stroke=\"{}\" stroke-width=\"3\"{dash} marker-end=\"url(#arrow-{})\"/><text class=\"label\" x=\"{}\" y=\"{}\">{}</text><title>{} → {} {} over the {}: {}</title></g>",
            ge.verdict,
            esc(&ge.from),
            esc(&ge.to),
            ge.verdict,
            ge.path,
            ge.count,
            if shown { "" } else { " style=\"display:none\"" },
            colour(ge.verdict),
            ge.verdict,
            f(mx),
            f(my - 4.0),
            esc(&label),
            esc(&ge.from),
            esc(&ge.to),
            ge.verdict,
            ge.path,
            esc(&label)
        );
    }
    s += "</g>\n</svg>\n";
    s += "<table id=\"edge-table\">\n<thead><tr><th>from</th><th>to</th><th>verdict</th><th>path</th><th>flows</th><th>ports (rules)</th><th>last seen</th></tr></thead>\n<tbody>\n";
    for e in &map.edges {
        let _ = writeln!(
            s,
            "<tr class=\"{}\" data-from=\"{}\" data-to=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            e.verdict,
            esc(&e.from),
            esc(&e.to),
            esc(&e.from),
            esc(&e.to),
            e.verdict,
            e.path,
            e.count,
            esc(&e.label()),
            crate::output::time(e.last / 1000)
        );
    }
    s += "</tbody>\n</table>\n<script>\n";
    s += SCRIPT;
    s += "</script>\n</body>\n</html>\n";
    s
}

fn edge(sc: &Scene<'_>, e: &Edge) -> String {
    let hidden = sc.collapsed(&e.from_group) && sc.collapsed(&e.to_group);
    let a = sc.end(&e.from, &e.from_group);
    let b = sc.end(&e.to, &e.to_group);
    let (d, (mx, my)) = layout::curve(a, b, 9.0);
    let dash = match (e.verdict, e.path) {
        (_, Way::Underlay) => " stroke-dasharray=\"2 4\"",
        (Seen::WouldDeny, _) => " stroke-dasharray=\"8 4\"",
        _ => "",
    };
    let ports: Vec<&str> = e.ports.iter().map(|p| p.port.as_str()).collect();
    let label = e.label();
    format!(
        "<g class=\"edge {}\" data-from=\"{}\" data-to=\"{}\" data-from-group=\"{}\" data-to-group=\"{}\" data-verdict=\"{}\" data-path=\"{}\" data-ports=\"{}\" data-count=\"{}\" data-rules=\"{}\"{}><path d=\"{d}\" fill=\"none\" stroke=\"{}\" stroke-width=\"1.6\"{dash} marker-end=\"url(#arrow-{})\"/><text class=\"label\" x=\"{}\" y=\"{}\">{}</text><title>{} → {} {} over the {}: {}</title></g>\n",
        e.verdict,
        esc(&e.from),
        esc(&e.to),
        esc(&e.from_group),
        esc(&e.to_group),
        e.verdict,
        e.path,
        esc(&ports.join(" ")),
        e.count,
        esc(&e.rules().join(" ")),
        if hidden {
            " style=\"display:none\""
        } else {
            ""
        },
        colour(e.verdict),
        e.verdict,
        f(mx),
        f(my - 3.0),
        esc(&label),
        esc(&e.from),
        esc(&e.to),
        e.verdict,
        e.path,
        esc(&label)
    )
}

const STYLE: &str = r#"body { font-family: sans-serif; margin: 16px; color: #222; background: #fff; }
h1 { font-size: 20px; margin: 0 0 4px; }
p.meta { font-size: 13px; color: #555; margin: 0 0 6px; }
p.legend .k { font-size: 12px; padding: 1px 8px; border-radius: 8px; color: #fff; }
.k.allow { background: #2e7d32; } .k.deny { background: #c62828; } .k.would-deny { background: #ef6c00; }
p.legend .k.underlay { background: #fff; color: #222; border: 1px dotted #222; }
svg { display: block; border: 1px solid #ddd; border-radius: 6px; background: #fafafa; }
g.group rect.box { fill: #fff; stroke: #90a4ae; }
g.group.outside rect.box { fill: #fbe9e7; }
g.group .collapsed-box rect { fill: #eceff1; stroke: #546e7a; stroke-width: 1.5; }
g.group text.toggle { font-size: 13px; font-weight: bold; cursor: pointer; fill: #263238; }
g.group text.count { font-size: 12px; fill: #455a64; }
g.node circle { fill: #546e7a; }
g.node text { font-size: 11px; fill: #263238; }
g.edge text.label, g.gedge text.label { font-size: 10px; display: none; paint-order: stroke; stroke: #fff; stroke-width: 3px; }
g.gedge text.label { display: inline; }
g.edge:hover path { stroke-width: 3.5; } g.edge:hover text.label { display: inline; }
table#edge-table { border-collapse: collapse; margin-top: 12px; font-size: 12px; }
table#edge-table td, table#edge-table th { border-bottom: 1px solid #eee; padding: 2px 8px; text-align: left; }
tr.deny td:nth-child(3) { color: #c62828; } tr.would-deny td:nth-child(3) { color: #ef6c00; } tr.allow td:nth-child(3) { color: #2e7d32; }
"#;

/// Collapsing and expanding groups; everything else is drawn already.
const SCRIPT: &str = r#"(function () {
  var svg = document.getElementById('map');
  var groups = {}, nodes = {};
  svg.querySelectorAll('g.group').forEach(function (g) { groups[g.dataset.group] = g; });
  svg.querySelectorAll('g.node').forEach(function (n) { nodes[n.dataset.identity] = n; });
  function collapsed(name) { var g = groups[name]; return !!g && g.dataset.collapsed === 'true'; }
  function end(identity, group) {
    if (collapsed(group)) { var g = groups[group]; return [+g.dataset.cx, +g.dataset.cy]; }
    var n = nodes[identity]; return [+n.dataset.x, +n.dataset.y];
  }
  // As layout::curve: a quadratic curve bending left, cut short by r at both ends.
  function curve(a, b, r) {
    var dx = b[0] - a[0], dy = b[1] - a[1], len = Math.sqrt(dx * dx + dy * dy);
    if (len > 2 * r) {
      var ux = dx / len * r, uy = dy / len * r;
      a = [a[0] + ux, a[1] + uy]; b = [b[0] - ux, b[1] - uy];
    }
    dx = b[0] - a[0]; dy = b[1] - a[1];
    var cx = (a[0] + b[0]) / 2 + dy * 0.18, cy = (a[1] + b[1]) / 2 - dx * 0.18;
    var f = function (v) { return v.toFixed(1); };
    return {
      d: 'M' + f(a[0]) + ',' + f(a[1]) + ' Q' + f(cx) + ',' + f(cy) + ' ' + f(b[0]) + ',' + f(b[1]),
      mid: [0.25 * a[0] + 0.5 * cx + 0.25 * b[0], 0.25 * a[1] + 0.5 * cy + 0.25 * b[1]]
    };
  }
  function apply() {
    Object.keys(groups).forEach(function (name) {
      var g = groups[name], c = collapsed(name);
      g.querySelector('.members').style.display = c ? 'none' : '';
      g.querySelector('.collapsed-box').style.display = c ? '' : 'none';
      g.querySelector('rect.box').style.display = c ? 'none' : '';
      g.querySelector('tspan.sign').textContent = c ? '+' : '\u2212';
    });
    svg.querySelectorAll('g.edge').forEach(function (e) {
      var fg = e.dataset.fromGroup, tg = e.dataset.toGroup;
      var both = collapsed(fg) && collapsed(tg);
      e.style.display = both ? 'none' : '';
      if (both) { return; }
      var c = curve(end(e.dataset.from, fg), end(e.dataset.to, tg), 9);
      e.querySelector('path').setAttribute('d', c.d);
      var t = e.querySelector('text');
      t.setAttribute('x', c.mid[0].toFixed(1)); t.setAttribute('y', (c.mid[1] - 3).toFixed(1));
    });
    svg.querySelectorAll('g.gedge').forEach(function (e) {
      var on = collapsed(e.dataset.fromGroup) && collapsed(e.dataset.toGroup);
      e.style.display = on ? '' : 'none';
    });
  }
  svg.querySelectorAll('g.group text.toggle').forEach(function (t) {
    t.addEventListener('click', function () {
      var g = t.parentNode;
      g.dataset.collapsed = g.dataset.collapsed === 'true' ? 'false' : 'true';
      apply();
    });
  });
  apply();
  document.body.dataset.ready = 'true';
})();
"#;
