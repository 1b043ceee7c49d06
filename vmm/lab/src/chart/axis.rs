//! The logarithmic y axes of the charts: their range and tick marks (the
//! rules are in the [chart module's documentation](super)).

use super::Spread;

/// Most decades a y axis spans.
const MAX_DECADES: i32 = 12;

/// The y range `(floor, top)` of a log axis for these bars (see the chart
/// module's documentation).
pub(super) fn y_range(bars: &[Vec<Option<Spread>>]) -> (f64, f64) {
    let values = bars.iter().flatten().flatten().flat_map(|s| [s.min, s.median, s.max]);
    let (mut smallest, mut largest) = (f64::INFINITY, 0.0_f64);
    for v in values.filter(|v| *v > 0.0) {
        smallest = smallest.min(v);
        largest = largest.max(v);
    }
    if largest <= 0.0 {
        return (0.5, 10.0);
    }
    // Capped so the axis stays finite; anything above is clipped to the top.
    let top_exp = (decade_of(largest * 1.25) + 1).min(300);
    let floor_exp = decade_of(smallest).clamp(top_exp - MAX_DECADES, top_exp - 1);
    (0.5 * pow10(floor_exp), pow10(top_exp))
}

/// The exponent of the power of ten at or below `v` (> 0), within
/// -400..=400 (infinity gives 400).
fn decade_of(v: f64) -> i32 {
    let e = v.log10().floor().clamp(-400.0, 400.0) as i32;
    // Guard against log10 rounding just under an exact power of ten.
    if e < 400 && pow10(e + 1) <= v {
        e + 1
    } else {
        e
    }
}

fn pow10(exp: i32) -> f64 {
    // Parsing "1e<exp>" gives the closest f64, unlike powi's repeated products.
    format!("1e{exp}").parse().unwrap_or(f64::NAN)
}

/// Tick values of a log axis from `floor` to `top`: powers of ten, and 2 and
/// 5 times them when at most three powers of ten fall on the axis.
pub(super) fn y_ticks(floor: f64, top: f64) -> Vec<f64> {
    let (lo, hi) = (decade_of(floor), decade_of(top));
    let dense = hi - lo <= 3;
    let mut ticks = Vec::new();
    for e in lo..=hi {
        let p = pow10(e);
        let mults: &[f64] = if dense { &[1.0, 2.0, 5.0] } else { &[1.0] };
        ticks.extend(mults.iter().map(|m| m * p).filter(|t| *t > floor * 1.0001 && *t <= top * 1.0001));
    }
    ticks
}

/// A tick label: plain digits, or k / M / G for thousands and above;
/// `5e-6`-style below 0.001 and from 10^12 on.
pub(super) fn tick_label(v: f64) -> String {
    if v > 0.0 && !(1e-3..1e12).contains(&v) {
        let e = decade_of(v);
        return format!("{}e{e}", (v / pow10(e)).round());
    }
    let (scaled, suffix) = match v {
        v if v >= 1e9 => (v / 1e9, "G"),
        v if v >= 1e6 => (v / 1e6, "M"),
        v if v >= 1e3 => (v / 1e3, "k"),
        v => (v, ""),
    };
    let decimals = if scaled >= 1.0 || scaled <= 0.0 { 0 } else { (-decade_of(scaled)).clamp(0, 12) as usize };
    format!("{scaled:.decimals$}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spread(median: f64, min: f64, max: f64) -> Spread {
        Spread { median, min, max }
    }

    #[test]
    fn log_axis_range_and_ticks() {
        let bars = vec![vec![Some(spread(1.0, 1.0, 1.0)), Some(spread(100_000.0, 0.0, 100_000.0))]];
        assert_eq!(y_range(&bars), (0.5, 1e6));
        assert_eq!(y_ticks(0.5, 1e6), vec![1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6]);
        assert_eq!(y_range(&[vec![None, Some(Spread::default())]]), (0.5, 10.0));
        assert_eq!(y_ticks(0.5, 10.0), vec![1.0, 2.0, 5.0, 10.0]);
        let (floor, top) = y_range(&[vec![Some(spread(1e-30, 1e-30, 1e-30)), Some(spread(10.0, 10.0, 10.0))]]);
        assert_eq!(top, 100.0);
        assert_eq!(floor, 0.5 * pow10(2 - MAX_DECADES));
        assert_eq!(tick_label(0.01), "0.01");
        assert_eq!(tick_label(0.5), "0.5");
        assert_eq!(tick_label(20_000.0), "20k");
        assert_eq!(tick_label(1e6), "1M");
        assert_eq!(tick_label(2e-5), "2e-5");
        assert_eq!(tick_label(1e15), "1e15");
    }
}
