//! Charts of a comparison (SVG, drawn with plotters).
//!
//! Interface fixed by `compare`; the drawing is filled in separately.

use std::path::Path;

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
    /// plotters failed.
    #[error("cannot draw {path}: {reason}")]
    Draw {
        /// The SVG file.
        path: String,
        /// What plotters reported.
        reason: String,
    },
}

/// Writes the comparison's charts into one SVG file: exits per phase per
/// policy (grouped bars, median with a min-max whisker), and wall time per
/// phase per policy (the same layout).
pub fn write_svg(path: &Path, data: &ChartData) -> Result<(), ChartError> {
    let _ = data;
    Err(ChartError::Draw { path: path.display().to_string(), reason: "not drawn yet".into() })
}
