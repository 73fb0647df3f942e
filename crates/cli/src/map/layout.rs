//! Where the map draws things: group boxes on shelves, members in a grid inside their box, a
//! small box for each group collapsed. Pure: sizes in, coordinates out.

/// One identity's cell.
pub const CELL_W: f64 = 160.0;
pub const CELL_H: f64 = 28.0;
/// A box's header (the group's name, the toggle).
pub const HEADER: f64 = 34.0;
/// Space inside a box around the cells, and between boxes.
pub const PAD: f64 = 12.0;
pub const GAP: f64 = 48.0;
/// The widest a shelf of boxes gets before the next one starts.
pub const MAX_WIDTH: f64 = 1400.0;
/// A collapsed group's box.
pub const COLLAPSED_W: f64 = 180.0;
pub const COLLAPSED_H: f64 = 56.0;
/// The most members in a row inside a box.
pub const MAX_COLS: usize = 4;

/// A group's box.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Frame {
    pub x: f64,
    pub y: f64,
    pub w: f64,
    pub h: f64,
}

impl Frame {
    /// The centre of its collapsed box (at its top left).
    pub fn collapsed_centre(&self) -> (f64, f64) {
        (self.x + COLLAPSED_W / 2.0, self.y + COLLAPSED_H / 2.0)
    }
}

/// Every box and every member's point.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    pub width: f64,
    pub height: f64,
    /// Per group, in the order given.
    pub frames: Vec<Frame>,
    /// Per group, its members' points (the node's centre), in the order given.
    pub points: Vec<Vec<(f64, f64)>>,
}

/// Lays out groups of the given sizes, left to right on shelves, in order.
pub fn layout(sizes: &[usize]) -> Layout {
    let mut frames = Vec::with_capacity(sizes.len());
    let mut points = Vec::with_capacity(sizes.len());
    let (mut x, mut y, mut shelf_h, mut width) = (GAP / 2.0, GAP / 2.0, 0.0f64, 0.0f64);
    for &n in sizes {
        let cols = columns(n);
        let rows = n.div_ceil(cols).max(1);
        let w = (cols as f64 * CELL_W + 2.0 * PAD).max(COLLAPSED_W);
        let h = (HEADER + rows as f64 * CELL_H + PAD).max(COLLAPSED_H);
        if x > GAP && x + w > MAX_WIDTH {
            x = GAP / 2.0;
            y += shelf_h + GAP;
            shelf_h = 0.0;
        }
        let f = Frame { x, y, w, h };
        points.push(
            (0..n)
                .map(|i| {
                    let (r, c) = (i / cols, i % cols);
                    (
                        x + PAD + c as f64 * CELL_W + 8.0,
                        y + HEADER + r as f64 * CELL_H + CELL_H / 2.0,
                    )
                })
                .collect(),
        );
        frames.push(f);
        x += w + GAP;
        shelf_h = shelf_h.max(h);
        width = width.max(x);
    }
    Layout {
        width: width.max(COLLAPSED_W + GAP),
        height: y + shelf_h + GAP / 2.0,
        frames,
        points,
    }
}

/// Columns for a group of `n`: about square, at most [`MAX_COLS`].
fn columns(n: usize) -> usize {
    let mut c = 1;
    while c * c < n && c < MAX_COLS {
        c += 1;
    }
    c
}

/// The segment from `a` to `b`, cut short by `r` at both ends so that an arrow ends at the
/// edge of what it points to.
pub fn shorten(a: (f64, f64), b: (f64, f64), r: f64) -> ((f64, f64), (f64, f64)) {
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let len = (dx * dx + dy * dy).sqrt();
    if len <= 2.0 * r {
        return (a, b);
    }
    let (ux, uy) = (dx / len * r, dy / len * r);
    ((a.0 + ux, a.1 + uy), (b.0 - ux, b.1 - uy))
}

/// An edge from `a` to `b` as a quadratic curve bending to its left (so that `a -> b` and
/// `b -> a` part, and edges along one line are told apart), cut short by `r` at both ends: the
/// SVG path and the curve's midpoint (for its label).
pub fn curve(a: (f64, f64), b: (f64, f64), r: f64) -> (String, (f64, f64)) {
    let ((x1, y1), (x2, y2)) = shorten(a, b, r);
    let (dx, dy) = (x2 - x1, y2 - y1);
    let bend = 0.18;
    let (cx, cy) = ((x1 + x2) / 2.0 + dy * bend, (y1 + y2) / 2.0 - dx * bend);
    let mid = (
        0.25 * x1 + 0.5 * cx + 0.25 * x2,
        0.25 * y1 + 0.5 * cy + 0.25 * y2,
    );
    (
        format!("M{x1:.1},{y1:.1} Q{cx:.1},{cy:.1} {x2:.1},{y2:.1}"),
        mid,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxes_hold_their_members_and_never_overlap() {
        let sizes = [1, 3, 20, 9, 2, 50, 4];
        let l = layout(&sizes);
        for (i, f) in l.frames.iter().enumerate() {
            assert_eq!(l.points[i].len(), sizes[i]);
            for &(x, y) in &l.points[i] {
                assert!(x > f.x && x < f.x + f.w && y > f.y + HEADER - 1.0 && y < f.y + f.h);
            }
            assert!(f.x + f.w <= l.width && f.y + f.h <= l.height);
            for g in &l.frames[..i] {
                let apart =
                    f.x >= g.x + g.w || g.x >= f.x + f.w || f.y >= g.y + g.h || g.y >= f.y + f.h;
                assert!(apart, "{f:?} overlaps {g:?}");
            }
        }
        assert!(l.width <= MAX_WIDTH + GAP);
        assert_eq!(columns(20), 4);
        assert_eq!(columns(4), 2);
        let ((x1, _), (x2, _)) = shorten((0.0, 0.0), (100.0, 0.0), 10.0);
        assert_eq!((x1, x2), (10.0, 90.0));
        let (d, mid) = curve((0.0, 0.0), (100.0, 0.0), 10.0);
        assert_eq!(d, "M10.0,0.0 Q50.0,-14.4 90.0,0.0");
        assert!(
            (mid.0 - 50.0).abs() < 1e-9 && (mid.1 + 7.2).abs() < 1e-9,
            "{mid:?}"
        );
        // The other way bends the other way.
        let back = curve((100.0, 0.0), (0.0, 0.0), 10.0).1;
        assert!((back.1 - 7.2).abs() < 1e-9, "{back:?}");
    }
}
