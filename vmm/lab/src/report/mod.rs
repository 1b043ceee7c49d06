//! `vmm report`: results rendered from what `vmm compare` and `vmm bench`
//! wrote: the README's Results section in Markdown ([`markdown`]) and one
//! chart per workload with every view that ran ([`crate::chart`]).
//!
//! A results directory holds any of `floor.json`, `fault-<view>.json` and
//! `dedup.json` (`vmm bench` reports), and comparisons: a `summary.json`
//! (compare.json without its runs, the one committed) or a `compare.json`,
//! in the directory itself or in its subdirectories. A figure a document
//! does not have is shown as missing ("-"), never as 0.

pub mod markdown;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::compare::summary::CompareReport;

/// The markers around the README's results section.
pub const BEGIN: &str = "<!-- results:begin -->";
/// The end marker.
pub const END: &str = "<!-- results:end -->";

/// Why a report cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// A file or directory cannot be read or written.
    #[error("cannot {what} {path}")]
    Io {
        /// "read" or "write".
        what: &'static str,
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A document is not JSON of the expected shape.
    #[error("{path} is not a {what} document")]
    Parse {
        /// The file.
        path: String,
        /// What it should be.
        what: &'static str,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// Nothing to report from.
    #[error("no bench report, summary.json or compare.json in {0}")]
    Empty(String),
    /// The README has no results section to replace.
    #[error("{0} has no {BEGIN} ... {END} markers")]
    NoMarkers(String),
    /// A chart could not be drawn.
    #[error(transparent)]
    Chart(#[from] crate::chart::ChartError),
}

/// Everything found in the results directories.
#[derive(Debug, Default)]
pub struct Inputs {
    /// `floor.json`.
    pub floor: Option<Value>,
    /// `fault-<view>.json`, by view.
    pub faults: BTreeMap<String, Value>,
    /// `dedup.json`.
    pub dedup: Option<Value>,
    /// Comparisons by workload (image) and view, with the directory each
    /// came from.
    pub compares: BTreeMap<String, BTreeMap<String, (PathBuf, CompareReport)>>,
}

fn read(path: &Path) -> Result<String, ReportError> {
    std::fs::read_to_string(path).map_err(|source| ReportError::Io { what: "read", path: shown(path), source })
}

fn shown(path: &Path) -> String {
    path.display().to_string()
}

fn parse<T: serde::de::DeserializeOwned>(path: &Path, what: &'static str) -> Result<T, ReportError> {
    serde_json::from_str(&read(path)?).map_err(|source| ReportError::Parse { path: shown(path), what, source })
}

impl Inputs {
    /// Reads every results directory in `dirs`.
    pub fn read(dirs: &[PathBuf]) -> Result<Self, ReportError> {
        let mut inputs = Self::default();
        for dir in dirs {
            let before = inputs.count();
            inputs.read_dir(dir)?;
            if inputs.count() == before {
                return Err(ReportError::Empty(shown(dir)));
            }
        }
        Ok(inputs)
    }

    fn count(&self) -> usize {
        usize::from(self.floor.is_some())
            + self.faults.len()
            + usize::from(self.dedup.is_some())
            + self.compares.values().map(BTreeMap::len).sum::<usize>()
    }

    fn read_dir(&mut self, dir: &Path) -> Result<(), ReportError> {
        let io = |source| ReportError::Io { what: "read", path: shown(dir), source };
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir).map_err(io)?.flatten().map(|e| e.path()).collect();
        entries.sort();
        self.read_compare(dir)?;
        for path in entries {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            match name {
                "floor.json" => self.floor = Some(parse(&path, "vmm bench floor")?),
                "dedup.json" => self.dedup = Some(parse(&path, "vmm bench dedup")?),
                n if n.starts_with("fault-") && n.ends_with(".json") => {
                    let view = n.trim_start_matches("fault-").trim_end_matches(".json").to_string();
                    self.faults.insert(view, parse(&path, "vmm bench fault")?);
                }
                _ if path.is_dir() => self.read_compare(&path)?,
                _ => {}
            }
        }
        Ok(())
    }

    /// The comparison in `dir`, if it has one: summary.json, else compare.json.
    fn read_compare(&mut self, dir: &Path) -> Result<(), ReportError> {
        let Some(path) = ["summary.json", "compare.json"].iter().map(|f| dir.join(f)).find(|p| p.is_file()) else {
            return Ok(());
        };
        let report: CompareReport = parse(&path, "vmm compare")?;
        // A fleet is a workload of its own: `template-x8`.
        let workload = match report.setup.guests {
            n if n > 1 => format!("{}-x{n}", report.setup.image),
            _ => report.setup.image.clone(),
        };
        let by_view = self.compares.entry(workload).or_default();
        by_view.insert(report.setup.view.clone(), (dir.to_path_buf(), report));
        Ok(())
    }
}

/// A comparison document without its runs (which are in compare.json and
/// runs/): the part of a comparison that reports are made from.
pub fn summary_of(report: &CompareReport) -> CompareReport {
    CompareReport { runs: Vec::new(), ..report.clone() }
}

/// Replaces the section of `readme` from the line that is [`BEGIN`] to the
/// line that is [`END`] (markers quoted inside a line are text) with
/// `section`, which holds the markers.
pub fn splice(readme: &str, section: &str, path: &Path) -> Result<String, ReportError> {
    let lines: Vec<&str> = readme.split_inclusive('\n').collect();
    let at = |marker: &str, from: usize| lines.iter().skip(from).position(|l| l.trim() == marker).map(|i| i + from);
    let no_markers = || ReportError::NoMarkers(shown(path));
    let begin = at(BEGIN, 0).ok_or_else(no_markers)?;
    let end = at(END, begin).ok_or_else(no_markers)?;
    let mut out: String = lines[..begin].concat();
    out.push_str(section.trim_end_matches('\n'));
    out.push('\n');
    out.push_str(&lines[end + 1..].concat());
    Ok(out)
}

/// Writes one chart per workload (`<out>/<workload>.svg`, every view side
/// by side) and returns their paths by workload.
pub fn write_charts(inputs: &Inputs, out: &Path) -> Result<BTreeMap<String, PathBuf>, ReportError> {
    let mut charts = BTreeMap::new();
    for (workload, by_view) in &inputs.compares {
        let reports: Vec<&CompareReport> = views_in_order(by_view).map(|(_, (_, r))| r).collect();
        let name = workload.rsplit('/').next().unwrap_or(workload).trim_end_matches(".elf");
        let path = out.join(format!("{name}.svg"));
        crate::chart::write_svg(&path, &crate::chart::ChartData::of(&reports))?;
        charts.insert(workload.clone(), path);
    }
    Ok(charts)
}

/// The views of a workload, memslot first.
pub fn views_in_order<T>(by_view: &BTreeMap<String, T>) -> impl Iterator<Item = (&String, &T)> {
    let rank = |v: &str| if v == "memslot" { 0 } else { 1 };
    let mut views: Vec<_> = by_view.iter().collect();
    views.sort_by_key(|(v, _)| (rank(v), (*v).clone()));
    views.into_iter()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_section_between_the_markers_is_replaced_and_nothing_else() {
        let readme = format!("# t\n\nquoted: `{BEGIN}`\n\n## Results\n\n{BEGIN}\nold\n{END}\n\n### Reading\nhand\n");
        let new = format!("{BEGIN}\n\nnew\n{END}\n");
        let out = splice(&readme, &new, Path::new("README.md")).expect("markers");
        assert_eq!(
            out,
            format!("# t\n\nquoted: `{BEGIN}`\n\n## Results\n\n{BEGIN}\n\nnew\n{END}\n\n### Reading\nhand\n")
        );
        assert!(matches!(splice("none", &new, Path::new("R")), Err(ReportError::NoMarkers(_))));
    }
}
