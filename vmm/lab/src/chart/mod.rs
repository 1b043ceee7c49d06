//! Charts of a comparison (SVG, drawn with plotters).
//!
//! [`write_svg`] draws one SVG file (1000 x 900 px) holding a title line
//! ([`ChartData::title`]), one legend shared by both charts (a colour per
//! policy, in the order of [`ChartData::series`]) and two charts stacked
//! vertically:
//!
//! 1. "VM exits per phase": grouped bars, one group per guest phase, one bar
//!    per policy in each group; the bar is the median over the repeats and a
//!    thin black whisker spans the smallest to the largest value seen.
//! 2. "Wall time per phase": the same layout for the wall time in ms.
//!
//! # Logarithmic y axes and zeros
//!
//! Both y axes are logarithmic (base 10), because exits differ by orders of
//! magnitude between phases. A log axis cannot show 0, so:
//!
//! - the axis floor is half the power of ten at or below the smallest
//!   positive value in the chart (1 exit gives a floor of 0.5; with no
//!   positive value at all it is 0.5), so every positive value stands above
//!   the floor; tick labels are only put on powers of ten (plus 2 and 5 times
//!   them when at most three powers of ten fall on the axis), never on the
//!   floor;
//! - a value of 0 (or a negative one) is clipped to the floor: its bar has no
//!   height, and a median of 0 is marked by a "0" written just above the
//!   x axis (beside the whisker when there is one), so a missing bar never
//!   silently reads as "small";
//! - the axis top is the first power of ten above 1.25 times the largest
//!   value, so the tallest whisker keeps some room;
//! - at most 12 decades are drawn: positive values more than that
//!   far below the largest one are clipped to the floor like zeros (without
//!   the "0" mark).
//!
//! # Missing and non-finite figures
//!
//! A median that is NaN or infinite, or a phase a series has no entry for,
//! gets no bar and is marked "n/a". A non-finite min or max is replaced by
//! the median (no whisker on that side).
//!
//! # Empty data
//!
//! With no phases or no series, [`write_svg`] still succeeds: it writes the
//! title and, for each chart, its frame with its title and the note
//! "no data".

mod axis;

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use axis::{tick_label, y_range, y_ticks};

/// A median and its spread over the repeats of one figure.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Spread {
    /// Median over the repeats.
    pub median: f64,
    /// Smallest value seen.
    pub min: f64,
    /// Largest value seen.
    pub max: f64,
}

/// One policy's figures, one entry per phase (in `ChartData::phases` order).
#[derive(Debug, Clone, PartialEq)]
pub struct PolicySeries {
    /// The policy name (`off`, `change-pte`, ...).
    pub policy: String,
    /// VM exits per phase (every reason, including secondary-MMU faults).
    pub exits: Vec<Spread>,
    /// Wall time per phase, in milliseconds.
    pub wall_ms: Vec<Spread>,
}

/// What `vmm compare` charts.
#[derive(Debug, Clone, PartialEq)]
pub struct ChartData {
    /// Title line (image, RAM size, view, repeats).
    pub title: String,
    /// The guest's phase numbers, in order.
    pub phases: Vec<u32>,
    /// One series per policy, in the order the user gave.
    pub series: Vec<PolicySeries>,
}

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

/// Writes the comparison's charts into one SVG file: exits per phase per
/// policy (grouped bars, median with a min-max whisker), and wall time per
/// phase per policy (the same layout).
///
/// Both y axes are logarithmic; zeros sit on the axis floor and are marked
/// "0", see the [module documentation](self) for the details. Empty `phases`
/// or `series` give a chart that says "no data" rather than an error; NaN and
/// infinite figures are marked "n/a" and never panic.
///
/// # Errors
///
/// [`ChartError::Draw`] when plotters cannot draw or the file cannot be
/// written.
pub fn write_svg(path: &Path, data: &ChartData) -> Result<(), ChartError> {
    let fail = |source| ChartError::Draw { path: path.display().to_string(), source };
    let root = SVGBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    draw_all(&root, data).map_err(fail)?;
    root.present().map_err(fail)
}

/// Size of the SVG picture, in pixels.
const WIDTH: u32 = 1000;
const HEIGHT: u32 = 900;

/// Fraction of a phase's slot the group of bars takes.
const GROUP_WIDTH: f64 = 0.8;

/// x coordinates are integers, `SLOT` per phase (phase `i` is centred on
/// `i * SLOT`): plotters' f64 axis with fixed key points has no default
/// label formatting, the integer one has.
const SLOT: i64 = 10_000;

/// An x position, given in phases, as an x coordinate.
fn x_at(phases: f64) -> i64 {
    (phases * SLOT as f64).round() as i64
}

const FONT: &str = "sans-serif";

/// Policy colours (Okabe-Ito, distinguishable with colour blindness); cycled
/// when there are more policies.
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

/// Which figures of a series a chart shows.
type Pick = fn(&PolicySeries) -> &[Spread];

/// Draws everything on `root`.
fn draw_all<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, data: &ChartData) -> Drawn<(), DB> {
    root.fill(&WHITE)?;
    let body = root.titled(&data.title, (FONT, 28))?;
    let body = draw_legend(&body, &data.series)?;
    let halves = body.split_evenly((2, 1));
    let panels: [(&str, &str, Pick); 2] = [
        ("VM exits per phase", "exits (median of repeats)", |s| &s.exits),
        ("Wall time per phase", "ms (median of repeats)", |s| &s.wall_ms),
    ];
    for (area, (title, y_desc, pick)) in halves.iter().zip(panels) {
        let series: Vec<&[Spread]> = data.series.iter().map(pick).collect();
        draw_panel(area, title, y_desc, &data.phases, &series)?;
    }
    Ok(())
}

/// Draws the legend (a swatch and the name of each policy, wrapped into as
/// many rows as needed) at the top of `area` and returns the rest of it.
fn draw_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    series: &[PolicySeries],
) -> Drawn<DrawingArea<DB, Shift>, DB> {
    if series.is_empty() {
        return Ok(area.clone());
    }
    const ROW: i32 = 24;
    const SWATCH: i32 = 14;
    const GAP: i32 = 28;
    let style = TextStyle::from((FONT, 18).into_font()).color(&BLACK).pos(Pos::new(HPos::Left, VPos::Center));
    // Keep a margin on both sides: the text width is only an estimate.
    const SIDE: i32 = 10;
    let width = i32::try_from(area.dim_in_pixel().0).unwrap_or(i32::MAX).saturating_sub(2 * SIDE);
    // Lay the entries out first so the strip gets the height it needs.
    let mut placed = Vec::with_capacity(series.len());
    let (mut x, mut row) = (0, 0);
    for (i, s) in series.iter().enumerate() {
        let text_w = area.estimate_text_size(&s.policy, &style)?.0;
        let entry_w = SWATCH + 6 + i32::try_from(text_w).unwrap_or(i32::MAX / 2);
        if x > 0 && x + entry_w > width {
            x = 0;
            row += 1;
        }
        placed.push((i, x, row));
        x = x.saturating_add(entry_w + GAP);
    }
    let rows = row + 1;
    let strip_h = rows * ROW + 6;
    let (strip, rest) = area.split_vertically(strip_h);
    // Centre each row.
    for r in 0..rows {
        let in_row: Vec<_> = placed.iter().filter(|p| p.2 == r).collect();
        let Some(last) = in_row.last() else { continue };
        let last_w = {
            let name = &series[last.0].policy;
            let w = strip.estimate_text_size(name, &style)?.0;
            SWATCH + 6 + i32::try_from(w).unwrap_or(0)
        };
        let row_w = last.1 + last_w;
        let left = SIDE + ((width - row_w) / 2).max(0);
        for &&(i, x, _) in &in_row {
            let y = r * ROW + ROW / 2;
            let x = left + x;
            strip.draw(&Rectangle::new([(x, y - SWATCH / 2), (x + SWATCH, y + SWATCH / 2)], colour(i).filled()))?;
            strip.draw_text(&series[i].policy, &style, (x + SWATCH + 6, y))?;
        }
    }
    Ok(rest)
}

/// One bar as drawn: the figures cleaned of negatives and non-finite values,
/// or `None` when there is nothing to draw (missing or non-finite median).
fn clean(spread: Option<&Spread>) -> Option<Spread> {
    let s = spread?;
    if !s.median.is_finite() {
        return None;
    }
    let median = s.median.max(0.0);
    let min = if s.min.is_finite() { s.min.max(0.0).min(median) } else { median };
    let max = if s.max.is_finite() { s.max.max(median) } else { median };
    Some(Spread { median, min, max })
}

/// Draws one chart: grouped bars with whiskers, or the frame and
/// "no data" when there is nothing to show.
fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    y_desc: &str,
    phases: &[u32],
    series: &[&[Spread]],
) -> Drawn<(), DB> {
    if phases.is_empty() || series.is_empty() {
        return draw_no_data(area, title);
    }
    // bars[policy][phase]
    let bars: Vec<Vec<Option<Spread>>> =
        series.iter().map(|s| (0..phases.len()).map(|i| clean(s.get(i))).collect()).collect();
    let (floor, top) = y_range(&bars);
    let n = phases.len();
    let x_ticks: Vec<i64> = (0..n).map(|i| x_at(i as f64)).collect();

    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, 22))
        .margin(10)
        .margin_right(20)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(
            (x_at(-0.5)..x_at(n as f64 - 0.5)).with_key_points(x_ticks),
            (floor..top).log_scale().with_key_points(y_ticks(floor, top)),
        )?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .bold_line_style(RGBColor(220, 220, 220))
        .x_desc("guest phase  (bar: median, whisker: min-max; log y axis, a median of 0 is marked \"0\")")
        .y_desc(y_desc)
        .x_label_formatter(&|x| {
            let i = usize::try_from((x + SLOT / 2).div_euclid(SLOT)).ok();
            i.and_then(|i| phases.get(i)).map(u32::to_string).unwrap_or_default()
        })
        .y_label_formatter(&|y| tick_label(*y))
        .label_style((FONT, 16))
        .axis_desc_style((FONT, 16))
        .draw()?;

    let slot = GROUP_WIDTH / series.len() as f64;
    let plot = chart.plotting_area();
    for (j, per_phase) in bars.iter().enumerate() {
        for (i, bar) in per_phase.iter().enumerate() {
            let place = BarPlace { left: i as f64 - GROUP_WIDTH / 2.0 + j as f64 * slot, slot, floor, top };
            draw_bar(plot, &place, bar.as_ref(), colour(j))?;
        }
    }
    Ok(())
}

/// Where a bar goes: its left edge and width (in phases) and the y axis's range.
struct BarPlace {
    left: f64,
    slot: f64,
    floor: f64,
    top: f64,
}

/// Draws one bar: the median as a filled bar, a whisker from min to max, a
/// "0" for a median of 0 and "n/a" for a missing one.
///
/// `plot` is a chart's plotting area: x in [`SLOT`] units, y the figure.
fn draw_bar<DB, CT>(plot: &DrawingArea<DB, CT>, at: &BarPlace, bar: Option<&Spread>, colour: RGBColor) -> Drawn<(), DB>
where
    DB: DrawingBackend,
    CT: CoordTranslate<From = (i64, f64)>,
{
    let (floor, slot) = (at.floor, at.slot);
    let gap = slot * 0.08;
    let cap = x_at(slot * 0.18);
    let centre = x_at(at.left + slot / 2.0);
    let clip = |v: f64| v.clamp(floor, at.top);
    let mark = TextStyle::from((FONT, 15).into_font()).color(&BLACK).pos(Pos::new(HPos::Center, VPos::Bottom));
    let Some(s) = bar else {
        return plot.draw(&Text::new("n/a", (centre, floor), mark));
    };
    if s.median > 0.0 {
        let corners = [(x_at(at.left + gap), floor), (x_at(at.left + slot - gap), clip(s.median))];
        plot.draw(&Rectangle::new(corners, colour.filled()))?;
    }
    let (lo, hi) = (clip(s.min), clip(s.max));
    if s.median <= 0.0 {
        // A "0" beside a whisker rather than under it.
        let zero = if hi > lo {
            Text::new("0", (centre + cap, floor), mark.pos(Pos::new(HPos::Left, VPos::Bottom)))
        } else {
            Text::new("0", (centre, floor), mark)
        };
        plot.draw(&zero)?;
    }
    if hi > lo {
        let whisker = BLACK.stroke_width(1);
        plot.draw(&PathElement::new(vec![(centre, lo), (centre, hi)], whisker))?;
        for y in [lo, hi] {
            plot.draw(&PathElement::new(vec![(centre - cap, y), (centre + cap, y)], whisker))?;
        }
    }
    Ok(())
}

/// A chart without data: its title, an empty frame and "no data".
fn draw_no_data<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, title: &str) -> Drawn<(), DB> {
    let inner = area.margin(10, 10, 10, 10);
    let inner = inner.titled(title, (FONT, 22))?;
    let (w, h) = inner.dim_in_pixel();
    let (w, h) = (i32::try_from(w).unwrap_or(i32::MAX), i32::try_from(h).unwrap_or(i32::MAX));
    inner.draw(&Rectangle::new([(0, 0), (w - 1, h - 1)], BLACK.stroke_width(1)))?;
    let style = TextStyle::from((FONT, 20).into_font()).color(&BLACK).pos(Pos::new(HPos::Center, VPos::Center));
    inner.draw_text("no data", &style, (w / 2, h / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A unique temp file, removed on drop.
    struct TempSvg(std::path::PathBuf);

    impl TempSvg {
        fn new(tag: &str) -> Self {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let name = format!("vmm-chart-{tag}-{}-{n}.svg", std::process::id());
            Self(std::env::temp_dir().join(name))
        }

        fn read(&self) -> String {
            std::fs::read_to_string(&self.0).expect("read the SVG")
        }
    }

    impl Drop for TempSvg {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn spread(median: f64, min: f64, max: f64) -> Spread {
        Spread { median, min, max }
    }

    fn three_by_three() -> ChartData {
        let policies = ["off", "change-pte", "invalidate"];
        let series = policies
            .iter()
            .enumerate()
            .map(|(j, p)| {
                let k = j as f64 + 1.0;
                PolicySeries {
                    policy: (*p).to_string(),
                    exits: vec![
                        spread(10.0 * k, 8.0 * k, 14.0 * k),
                        spread(1000.0 * k, 900.0 * k, 1500.0 * k),
                        spread(100_000.0 * k, 90_000.0 * k, 120_000.0 * k),
                    ],
                    wall_ms: vec![
                        spread(0.2 * k, 0.1 * k, 0.3 * k),
                        spread(5.0 * k, 4.0, 9.0 * k),
                        spread(80.0 * k, 70.0 * k, 95.0 * k),
                    ],
                }
            })
            .collect();
        ChartData { title: "hello, 64M, memslot, 5 repeats".into(), phases: vec![1, 2, 3], series }
    }

    /// The contents of the SVG's `<text>` elements (plotters writes each on
    /// its own line between the tags).
    fn texts(svg: &str) -> Vec<&str> {
        svg.split("<text").skip(1).filter_map(|t| Some(t.split_once('>')?.1.split_once("</text>")?.0.trim())).collect()
    }

    fn assert_svg(text: &str) {
        assert!(text.trim_start().starts_with("<svg"), "not an SVG: {}", &text[..text.len().min(80)]);
        assert!(text.trim_end().ends_with("</svg>"));
    }

    #[test]
    fn chart_three_phases_three_policies() {
        let file = TempSvg::new("3x3");
        let data = three_by_three();
        write_svg(&file.0, &data).expect("draw");
        let svg = file.read();
        assert_svg(&svg);
        let texts = texts(&svg);
        for s in &data.series {
            assert!(texts.contains(&s.policy.as_str()), "no legend entry for {}", s.policy);
        }
        for t in ["VM exits per phase", "Wall time per phase", "exits (median of repeats)", "ms (median of repeats)"] {
            assert!(texts.contains(&t), "missing {t}");
        }
        assert!(texts.contains(&data.title.as_str()));
        // 9 bars per chart, plus the legend's 3 swatches.
        assert_eq!(svg.matches("<rect").count(), 1 + 3 + 2 * 9, "one background, 3 swatches, 18 bars");
        for tick in ["1", "10", "100", "1k", "10k", "100k", "1M", "0.1"] {
            assert!(texts.contains(&tick), "no tick label {tick}");
        }
        for phase in ["1", "2", "3"] {
            assert!(texts.contains(&phase));
        }
        assert!(!svg.contains("NaN"));
    }

    #[test]
    fn chart_with_zeros_and_non_finite_values() {
        let file = TempSvg::new("zeros");
        let mut data = three_by_three();
        data.series[0].exits = vec![spread(0.0, 0.0, 0.0); 3];
        data.series[1].exits[0] = spread(0.0, 0.0, 4.0);
        data.series[1].wall_ms =
            vec![spread(f64::NAN, f64::NAN, f64::NAN), spread(f64::INFINITY, 1.0, 2.0), spread(1.0, -1.0, f64::NAN)];
        data.series[2].exits.truncate(1); // a series shorter than the phases
        data.series[2].wall_ms[1] = spread(f64::MAX, f64::MIN_POSITIVE, f64::MAX);
        write_svg(&file.0, &data).expect("draw");
        let svg = file.read();
        assert_svg(&svg);
        let texts = texts(&svg);
        assert_eq!(texts.iter().filter(|t| **t == "0").count(), 4, "each zero median is marked");
        // Phases 2 and 3 of the short series, the NaN and the infinite median.
        assert_eq!(texts.iter().filter(|t| **t == "n/a").count(), 4, "missing and non-finite medians are marked");
        assert!(!svg.contains("NaN") && !svg.contains("inf"));

        // Every figure zero: the axes still get a range.
        let file = TempSvg::new("all-zero");
        for s in &mut data.series {
            s.exits = vec![Spread::default(); 3];
            s.wall_ms = vec![Spread::default(); 3];
        }
        write_svg(&file.0, &data).expect("draw");
        assert_svg(&file.read());
    }

    #[test]
    fn chart_without_data() {
        for (tag, phases, with_series) in
            [("empty", vec![], false), ("no-phases", vec![], true), ("no-series", vec![1, 2], false)]
        {
            let file = TempSvg::new(tag);
            let mut data = ChartData { title: String::new(), phases, series: vec![] };
            if with_series {
                data.series = three_by_three().series;
            }
            write_svg(&file.0, &data).expect("draw");
            let svg = file.read();
            assert_svg(&svg);
            let texts = texts(&svg);
            assert_eq!(texts.iter().filter(|t| **t == "no data").count(), 2);
            assert!(texts.contains(&"VM exits per phase") && texts.contains(&"Wall time per phase"));
        }
    }

    #[test]
    fn unwritable_path_is_an_error() {
        let path = std::env::temp_dir().join(format!("vmm-chart-no-such-dir-{}", std::process::id())).join("c.svg");
        let err = write_svg(&path, &three_by_three()).expect_err("no directory");
        assert!(matches!(err, ChartError::Draw { .. }));
        assert!(err.to_string().contains("c.svg"));
    }
}
