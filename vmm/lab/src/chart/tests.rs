//! The chart drawn for real: the SVG rendered to pixels (resvg), each
//! panel checked for what it must show.

use super::*;
use crate::compare::fold::tests::{phase, report, run_with};
use crate::compare::summary::CompareReport;

/// A unique temp file, removed on drop.
struct TempSvg(std::path::PathBuf);

impl TempSvg {
    fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        Self(std::env::temp_dir().join(format!("vmm-chart-{tag}-{}-{n}.svg", std::process::id())))
    }
}

impl Drop for TempSvg {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The SVG at `path` as pixels.
fn render(path: &Path) -> resvg::tiny_skia::Pixmap {
    let svg = std::fs::read_to_string(path).expect("read the SVG");
    let mut opt = resvg::usvg::Options::default();
    opt.fontdb_mut().load_system_fonts();
    // plotters asks for "sans-serif"; fontdb maps it to Arial unless told.
    opt.fontdb_mut().set_sans_serif_family("DejaVu Sans");
    let tree = resvg::usvg::Tree::from_str(&svg, &opt).expect("a valid SVG");
    let size = tree.size().to_int_size();
    let mut pixmap = resvg::tiny_skia::Pixmap::new(size.width(), size.height()).expect("pixmap");
    resvg::render(&tree, resvg::tiny_skia::Transform::default(), &mut pixmap.as_mut());
    pixmap
}

/// Pixels of `rect` that are neither white nor the grid's grey: bars,
/// whiskers, the axis, labels.
fn inked(p: &resvg::tiny_skia::Pixmap, (x, y, w, h): Rect) -> usize {
    let mut n = 0;
    for yy in y.max(0)..(y + h).min(p.height() as i32) {
        for xx in x.max(0)..(x + w).min(p.width() as i32) {
            let c = p.pixel(xx as u32, yy as u32).expect("inside");
            let grey = c.red() == c.green() && c.green() == c.blue() && c.red() >= 200;
            if c.alpha() > 0 && !grey {
                n += 1;
            }
        }
    }
    n
}

/// pagefill-like phases: the reads after the merge refault under
/// range-flush only.
fn pagefill(view: &str) -> CompareReport {
    let phases = |faults: u64| {
        let mut ps = vec![phase(1, 2), phase(2, 3), phase(3, 4)];
        for (p, name) in ps.iter_mut().zip(["fill 16 groups", "merge pass", "read word 0"]) {
            p.name = Some(name.into());
            p.figures.kvm.insert("exits".into(), 3600 + 2 * faults);
        }
        for _ in 0..faults {
            ps[2].figures.exits.record(vmm::stats::ExitKind::EptRead);
        }
        ps
    };
    let runs = vec![
        run_with("off", 0, phases(0), vec![]),
        run_with("change-pte", 0, phases(0), vec![]),
        run_with("range-flush", 0, phases(3584), vec![]),
    ];
    let mut r = report(&["off", "change-pte", "range-flush"], runs);
    r.setup.view = view.into();
    r
}

#[test]
fn every_panel_of_both_views_shows_its_bars() {
    let (memslot, uffd) = (pagefill("memslot"), pagefill("uffd"));
    let data = ChartData::of(&[&memslot, &uffd]);
    let file = TempSvg::new("views");
    write_svg(&file.0, &data).expect("draw");
    let pixels = render(&file.0);
    let l = layout(&data);
    assert_eq!((pixels.width(), pixels.height()), (l.width, l.height));
    assert_eq!((l.plots.len(), l.plots[0].len()), (3, 2), "three rows, a column per view");
    for (r, row) in l.plots.iter().enumerate() {
        for (v, rect) in row.iter().enumerate() {
            let area = (rect.2 * rect.3) as usize;
            let ink = inked(&pixels, *rect);
            assert!(ink * 100 > area, "row {r} view {v}: {ink} inked pixels of {area}: blank");
        }
    }
    // The headline result: the faults bar of range-flush in "read word 0".
    let svg = std::fs::read_to_string(&file.0).expect("svg");
    assert!(svg.contains("3,584"), "the fault count is written on its bar");
    assert!(svg.contains("1.00×"), "the whole run's ratio to off is written on its bar");
    assert!(svg.contains("read word 0") && svg.contains("memslot view") && svg.contains("uffd view"));
}

#[test]
fn the_title_fits_the_picture() {
    let r = pagefill("memslot");
    let data = ChartData::of(&[&r]);
    let file = TempSvg::new("title");
    write_svg(&file.0, &data).expect("draw");
    let pixels = render(&file.0);
    // The rightmost column of pixels has no ink: nothing ran off the edge.
    let edge = (pixels.width() as i32 - 2, 0, 2, HEADER);
    assert_eq!(inked(&pixels, edge), 0, "the title or legend is clipped at the right edge");
}

#[test]
fn a_missing_ratio_is_marked_not_drawn_as_zero() {
    let runs = vec![run_with("legacy", 0, vec![phase(1, 2)], vec![])];
    let r = report(&["legacy"], runs);
    let data = ChartData::of(&[&r]);
    assert_eq!(data.views[0].groups[0].cells[0].exits_ratio, None, "no off: no ratio");
    let file = TempSvg::new("no-off");
    write_svg(&file.0, &data).expect("draw");
    let svg = std::fs::read_to_string(&file.0).expect("svg");
    assert!(svg.contains("n/a"));
}

#[test]
fn an_unwritable_path_is_an_error() {
    let path = std::env::temp_dir().join(format!("vmm-chart-no-such-dir-{}", std::process::id())).join("c.svg");
    let r = pagefill("memslot");
    let err = write_svg(&path, &ChartData::of(&[&r])).expect_err("no directory");
    assert!(err.to_string().contains("c.svg"));
}
