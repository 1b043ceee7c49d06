//! The chart of a comparison (SVG, drawn with plotters), made to be shown:
//! what the README tells people to compare, per named phase, on linear
//! axes.
//!
//! One column of three panels per view (both views side by side when both
//! ran, from `vmm report`; one for `vmm compare`'s compare.svg):
//!
//! 1. per phase, the secondary-MMU faults the VMM served, a bar per policy
//!    stacked by kind (read: the policy's colour; write: lighter; fetch:
//!    darker);
//! 2. per phase, beside them on the same axis, the VM exits the host KVM
//!    counted (which also sees the faults the kernel serves itself: all of
//!    the `kernel` policy's);
//! 3. the whole run as ratios to `off` on a linear axis: the host KVM's
//!    exits and the wall time, with a whisker from the smallest to the
//!    largest run (per phase, `off` takes a handful of exits, so per-phase
//!    ratios would only show those handfuls).
//!
//! Each group of bars in 1 and 2 is a phase, labelled with its number and
//! name; repeated phases (the same name, or unnamed with the same number)
//! are one group (`×16`: the median over them). Bars are medians over the
//! repeats, their value written above them; a missing figure is marked
//! `n/a`, never drawn as 0. Panels of a row share their y axis (rows 1 and
//! 2 one axis), so views and rows compare at a glance. [`layout`] says
//! where each panel's plot is (for tests).

mod axis;
pub mod data;

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontTransform;

pub use data::{Cell, ChartData, Group, Spread, ViewData};

/// Errors while drawing.
#[derive(Debug, thiserror::Error)]
pub enum ChartError {
    /// plotters failed, or the file could not be written.
    #[error("cannot draw {path}")]
    Draw {
        /// The SVG file.
        path: String,
        /// What plotters reported.
        #[source]
        source: DrawingAreaErrorKind<std::io::Error>,
    },
}

/// What drawing on a `DB` gives: plotters' error for that backend.
type Drawn<T, DB> = Result<T, DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

const FONT: &str = "sans-serif";

/// Policy colours (Okabe-Ito, distinguishable with colour blindness).
const PALETTE: [RGBColor; 8] = [
    RGBColor(0, 114, 178),
    RGBColor(230, 159, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(86, 180, 233),
    RGBColor(213, 94, 0),
    RGBColor(120, 120, 120),
    RGBColor(240, 228, 66),
];

fn colour(index: usize) -> RGBColor {
    PALETTE[index % PALETTE.len()]
}

/// The policy's colour for faults of kind 0 (read), 1 (write), 2 (fetch).
fn shade(c: RGBColor, kind: usize) -> RGBColor {
    let mix = |v: u8, to: f64, by: f64| (f64::from(v) + (to - f64::from(v)) * by).round() as u8;
    match kind {
        0 => c,
        1 => RGBColor(mix(c.0, 255.0, 0.55), mix(c.1, 255.0, 0.55), mix(c.2, 255.0, 0.55)),
        _ => RGBColor(mix(c.0, 0.0, 0.45), mix(c.1, 0.0, 0.45), mix(c.2, 0.0, 0.45)),
    }
}

/// Pixels: the header (title, subtitle, legend), a panel, its parts.
const HEADER: i32 = 150;
const PANEL: i32 = 330;
const PANEL_TITLE: i32 = 34;
const PLOT: i32 = 200;
const AXIS: i32 = 70;
const MARGIN: i32 = 24;

/// Where one panel's plot area is, in pixels: (left, top, width, height).
pub type Rect = (i32, i32, i32, i32);

/// The picture's size and each panel's plot area, row by row (faults,
/// exits, wall time), view by view.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `plots[row][view]`.
    pub plots: Vec<Vec<Rect>>,
    /// Width of one phase group.
    group_w: i32,
}

/// The layout of `data`'s chart.
pub fn layout(data: &ChartData) -> Layout {
    let policies = data.views.iter().map(|v| v.policies.len()).max().unwrap_or(1) as i32;
    let group_w = (14 * policies + 30).max(96);
    // The phase groups: the whole run (the last group) is drawn as ratios.
    let widths: Vec<i32> =
        data.views.iter().map(|v| AXIS + v.groups.len().saturating_sub(1).max(2) as i32 * group_w + 16).collect();
    let width = (MARGIN * 2 + widths.iter().sum::<i32>() + MARGIN * (widths.len() as i32 - 1).max(0)).max(960);
    let plots = (0..ROWS.len() as i32)
        .map(|row| {
            let mut x = MARGIN;
            widths
                .iter()
                .map(|w| {
                    let rect = (x + AXIS, HEADER + row * PANEL + PANEL_TITLE, w - AXIS - 16, PLOT);
                    x += w + MARGIN;
                    rect
                })
                .collect()
        })
        .collect();
    let height = HEADER + ROWS.len() as i32 * PANEL + 20;
    Layout { width: width as u32, height: height as u32, plots, group_w }
}

/// A row of panels: its title and what each bar shows.
struct Row {
    title: &'static str,
    ratio: bool,
}

const ROWS: [Row; 3] = [
    Row { title: "secondary-MMU faults the VMM served, per phase", ratio: false },
    Row { title: "VM exits the host KVM counted, per phase", ratio: false },
    Row { title: "the whole run, as a ratio to off", ratio: true },
];

/// The groups of the ratio row: what is divided by `off`'s.
const RATIO_GROUPS: [&str; 2] = ["VM exits (host KVM)", "wall time"];

/// One bar as drawn: stacked values (faults) or one value, and a ratio's
/// spread; None: n/a.
type Bar = Option<(Vec<f64>, Option<Spread>)>;

/// A group of bars as drawn: its label, the phases it stands for, a bar
/// per policy.
type BarGroup = (String, usize, Vec<Bar>);

/// One bar: stacked values (faults), a count, or a ratio with its spread;
/// None: n/a. In the ratio row, `g` is the index in [`RATIO_GROUPS`].
fn bar(cell: &Cell, row: usize, g: usize) -> Bar {
    match (row, g) {
        (0, _) => Some((cell.faults.to_vec(), None)),
        (1, _) => cell.exits.map(|e| (vec![e], None)),
        (_, 0) => cell.exits_ratio.map(|s| (vec![s.median], Some(s))),
        _ => cell.wall_ratio.map(|s| (vec![s.median], Some(s))),
    }
}

/// The groups a panel of `row` draws: each with its label, how many
/// phases it stands for, and its cells.
fn panel_groups(view: &ViewData, row: usize) -> Vec<BarGroup> {
    if !ROWS[row].ratio {
        // The phases only: the whole run is the ratio row's (its counts
        // would flatten every phase's bars).
        let phases = &view.groups[..view.groups.len().saturating_sub(1)];
        return phases
            .iter()
            .map(|g| (g.label.clone(), g.times, g.cells.iter().map(|c| bar(c, row, 0)).collect()))
            .collect();
    }
    let whole = view.groups.last();
    RATIO_GROUPS
        .iter()
        .enumerate()
        .map(|(i, label)| {
            let cells = whole.map(|g| g.cells.iter().map(|c| bar(c, row, i)).collect()).unwrap_or_default();
            (label.to_string(), 1, cells)
        })
        .collect()
}

/// Writes the chart of `data` as an SVG file.
///
/// # Errors
///
/// [`ChartError::Draw`] when plotters cannot draw or the file cannot be
/// written.
pub fn write_svg(path: &Path, data: &ChartData) -> Result<(), ChartError> {
    let fail = |source| ChartError::Draw { path: path.display().to_string(), source };
    let l = layout(data);
    let root = SVGBackend::new(path, (l.width, l.height)).into_drawing_area();
    draw_all(&root, data, &l).map_err(fail)?;
    root.present().map_err(fail)
}

fn text(size: u32, pos: Pos) -> TextStyle<'static> {
    TextStyle::from((FONT, size).into_font()).color(&BLACK).pos(pos)
}

fn draw_all<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, data: &ChartData, l: &Layout) -> Drawn<(), DB> {
    root.fill(&WHITE)?;
    let left = Pos::new(HPos::Left, VPos::Top);
    let mut y = 14;
    let bold = TextStyle::from((FONT, 26, FontStyle::Bold).into_font()).color(&BLACK).pos(left);
    for line in axis::wrap(&data.title, (l.width as usize - 2 * MARGIN as usize) / 14) {
        root.draw_text(&line, &bold, (MARGIN, y))?;
        y += 32;
    }
    root.draw_text(&data.subtitle, &text(16, left), (MARGIN, y + 2))?;
    draw_legend(root, data, y + 34)?;
    let largest = |rows: &[usize]| {
        let bars = data.views.iter().flat_map(|v| rows.iter().flat_map(move |&r| panel_groups(v, r)));
        let bars = bars.flat_map(|(_, _, cells)| cells).flatten();
        bars.map(|(v, s)| s.map_or(v.iter().sum(), |s| s.max)).fold(0.0_f64, f64::max)
    };
    for (r, row) in ROWS.iter().enumerate() {
        let top = l.plots[r].iter().map(|p| p.3).max().unwrap_or(1);
        // Faults and exits on one axis: the faults are among the exits.
        let max = if row.ratio { largest(&[r]).max(1.0) } else { largest(&[0, 1]) };
        let scale = axis::Scale::new(max, top);
        for (view, rect) in data.views.iter().zip(&l.plots[r]) {
            let title = format!("{} view: {}", view.view, row.title);
            root.draw_text(&title, &text(17, left), (rect.0 - AXIS + 8, rect.1 - PANEL_TITLE + 8))?;
            draw_panel(root, view, r, *rect, &scale, l.group_w)?;
        }
    }
    Ok(())
}

/// The policies' colours, and the fault kinds' shades.
fn draw_legend<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, data: &ChartData, y: i32) -> Drawn<(), DB> {
    let style = text(16, Pos::new(HPos::Left, VPos::Center));
    let mut policies: Vec<&String> = Vec::new();
    for v in &data.views {
        for p in &v.policies {
            if !policies.contains(&p) {
                policies.push(p);
            }
        }
    }
    let mut x = MARGIN;
    for (i, p) in policies.iter().enumerate() {
        let c = colour(colour_index(data, p).unwrap_or(i));
        root.draw(&Rectangle::new([(x, y - 8), (x + 16, y + 8)], c.filled()))?;
        root.draw_text(p, &style, (x + 22, y))?;
        x += 40 + 9 * p.len() as i32;
    }
    x += 30;
    root.draw_text("faults:", &style, (x, y))?;
    x += 62;
    for (kind, name) in ["read", "write", "fetch"].iter().enumerate() {
        root.draw(&Rectangle::new([(x, y - 8), (x + 16, y + 8)], shade(RGBColor(90, 90, 90), kind).filled()))?;
        root.draw_text(name, &style, (x + 22, y))?;
        x += 80;
    }
    let note =
        "bars: medians over the repeats; whiskers: smallest to largest run; ×N: N identical phases, their median";
    root.draw_text(note, &text(14, Pos::new(HPos::Left, VPos::Center)), (MARGIN, y + 28))
}

/// A policy's colour index: its position among every view's policies.
fn colour_index(data: &ChartData, policy: &str) -> Option<usize> {
    let mut all: Vec<&str> = Vec::new();
    for v in &data.views {
        for p in &v.policies {
            if !all.contains(&p.as_str()) {
                all.push(p);
            }
        }
    }
    all.iter().position(|p| *p == policy)
}

/// One panel: axis, grid, bars and group labels.
fn draw_panel<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    view: &ViewData,
    row: usize,
    (x0, y0, w, h): Rect,
    scale: &axis::Scale,
    group_w: i32,
) -> Drawn<(), DB> {
    let grid = RGBColor(225, 225, 225);
    for (v, label) in scale.ticks() {
        let y = y0 + h - scale.px(v);
        root.draw(&PathElement::new(vec![(x0, y), (x0 + w, y)], grid.stroke_width(1)))?;
        root.draw_text(&label, &text(13, Pos::new(HPos::Right, VPos::Center)), (x0 - 6, y))?;
    }
    if ROWS[row].ratio {
        let y = y0 + h - scale.px(1.0);
        root.draw(&PathElement::new(vec![(x0, y), (x0 + w, y)], BLACK.stroke_width(1)))?;
    }
    root.draw(&PathElement::new(vec![(x0, y0 + h), (x0 + w, y0 + h)], BLACK.stroke_width(1)))?;
    let data = ChartData { title: String::new(), subtitle: String::new(), views: vec![view.clone()] };
    let groups = panel_groups(view, row);
    // The ratio row's two groups spread over the panel.
    let group_w = if ROWS[row].ratio { w / groups.len().max(1) as i32 } else { group_w };
    for (g, (label, times, bars)) in groups.into_iter().enumerate() {
        let gx = x0 + g as i32 * group_w;
        let bw = ((group_w - 16) / view.policies.len().max(1) as i32).clamp(3, 60);
        let left = gx + (group_w - bw * view.policies.len() as i32) / 2;
        for (j, bar) in bars.into_iter().enumerate() {
            let c = colour(colour_index(&data, &view.policies[j]).unwrap_or(j));
            draw_bar(root, bar, c, (left + j as i32 * bw, bw - 2), (y0, h), scale)?;
        }
        draw_group_label(root, &label, times, gx + group_w / 2, y0 + h + 6, group_w)?;
    }
    Ok(())
}

/// One bar at x `bx` of width `bw` in a plot from `y0` of height `h`.
fn draw_bar<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    bar: Bar,
    c: RGBColor,
    (bx, bw): (i32, i32),
    (y0, h): (i32, i32),
    scale: &axis::Scale,
) -> Drawn<(), DB> {
    let base = y0 + h;
    let centre = bx + bw / 2;
    let up = text(11, Pos::new(HPos::Left, VPos::Center)).transform(FontTransform::Rotate270);
    let Some((stack, spread)) = bar else {
        return root.draw_text("n/a", &up, (centre, base - 4));
    };
    let mut y = base;
    for (kind, v) in stack.iter().enumerate() {
        let top = base - scale.px(stack[..=kind].iter().sum());
        if *v > 0.0 && top < y {
            let fill = if spread.is_some() { c } else { shade(c, kind) };
            root.draw(&Rectangle::new([(bx, top), (bx + bw, y)], fill.filled()))?;
        }
        y = top.min(y);
    }
    let total: f64 = stack.iter().sum();
    let mut label_at = y;
    if let Some(s) = spread {
        let (lo, hi) = (base - scale.px(s.min), base - scale.px(s.max));
        if lo > hi {
            root.draw(&PathElement::new(vec![(centre, lo), (centre, hi)], BLACK.stroke_width(1)))?;
            root.draw(&PathElement::new(vec![(centre - 3, hi), (centre + 3, hi)], BLACK.stroke_width(1)))?;
        }
        label_at = label_at.min(hi);
    }
    let label = match spread {
        Some(s) => format!("{:.2}×", s.median),
        None => axis::count_label(total),
    };
    root.draw_text(&label, &up, (centre, label_at - 4))
}

/// A group's label under its bars: the phase's number and name, wrapped,
/// and `×N` for N identical phases.
fn draw_group_label<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    label: &str,
    times: usize,
    x: i32,
    y: i32,
    width: i32,
) -> Drawn<(), DB> {
    let style = text(12, Pos::new(HPos::Center, VPos::Top));
    let mut lines = axis::wrap(label, (width as usize / 7).max(6));
    lines.truncate(3);
    if times > 1 {
        lines.push(format!("×{times}"));
    }
    for (i, line) in lines.iter().enumerate() {
        root.draw_text(line, &style, (x, y + 14 * i as i32))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
