//! The charts' linear y axes (a range from 0 with round ticks), their
//! labels, and word wrapping for titles and phase names.

/// A linear y axis from 0 to a round top, over `px` pixels.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Scale {
    top: f64,
    step: f64,
    px: i32,
}

impl Scale {
    /// An axis that holds `max` (0 or less: an axis up to 1).
    pub(super) fn new(max: f64, px: i32) -> Self {
        let max = if max.is_finite() && max > 0.0 { max } else { 1.0 };
        let step = nice_step(max / 4.0);
        // Room above the tallest bar for its label.
        let top = ((max * 1.15) / step).ceil() * step;
        Self { top, step, px }
    }

    /// Pixels above the axis for `v` (clipped to the axis).
    pub(super) fn px(&self, v: f64) -> i32 {
        let v = if v.is_finite() { v.clamp(0.0, self.top) } else { 0.0 };
        (v / self.top * f64::from(self.px)).round() as i32
    }

    /// The ticks and their labels, from 0 to the top.
    pub(super) fn ticks(&self) -> Vec<(f64, String)> {
        let n = (self.top / self.step).round() as u32;
        (0..=n).map(|i| f64::from(i) * self.step).map(|v| (v, count_label(v))).collect()
    }
}

/// The round step (1, 2, 2.5 or 5 times a power of ten) at or above `raw`.
fn nice_step(raw: f64) -> f64 {
    let p = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * p).find(|s| *s >= raw * 0.999).unwrap_or(10.0 * p)
}

/// A value for people: `3,584` below ten thousand, then `10.8k`, `1.2M`;
/// fractions with up to two decimals.
pub(super) fn count_label(v: f64) -> String {
    match v {
        v if v >= 1e6 => format!("{:.1}M", v / 1e6),
        v if v >= 1e4 => format!("{:.1}k", v / 1e3),
        v if v.fract() == 0.0 => {
            let digits = format!("{v:.0}");
            let mut out = String::new();
            for (i, c) in digits.chars().enumerate() {
                if i > 0 && (digits.len() - i) % 3 == 0 {
                    out.push(',');
                }
                out.push(c);
            }
            out
        }
        v => format!("{v:.2}").trim_end_matches('0').trim_end_matches('.').to_string(),
    }
}

/// `text` in lines of at most about `width` characters, broken at spaces.
pub(super) fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for word in text.split_whitespace() {
        match lines.last_mut() {
            Some(line) if line.len() + 1 + word.len() <= width => {
                line.push(' ');
                line.push_str(word);
            }
            _ => lines.push(word.to_string()),
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_axes_get_round_ticks_from_zero() {
        let s = Scale::new(3584.0, 200);
        let ticks: Vec<f64> = s.ticks().iter().map(|t| t.0).collect();
        assert_eq!(ticks, [0.0, 1000.0, 2000.0, 3000.0, 4000.0, 5000.0]);
        assert_eq!(s.px(0.0), 0);
        assert_eq!(s.px(5000.0), 200);
        assert_eq!(s.px(1e12), 200, "clipped");
        assert_eq!(Scale::new(0.0, 100).ticks().last().map(|t| t.0), Some(1.25));
        let ratio: Vec<String> = Scale::new(7.0, 200).ticks().into_iter().map(|t| t.1).collect();
        assert_eq!(ratio, ["0", "2", "4", "6", "8", "10"]);
    }

    #[test]
    fn labels_and_wrapping() {
        assert_eq!(count_label(3584.0), "3,584");
        assert_eq!(count_label(10_752.0), "10.8k");
        assert_eq!(count_label(2.5), "2.5");
        assert_eq!(count_label(1.25), "1.25");
        assert_eq!(wrap("read every page, write every 8th", 16), ["read every page,", "write every 8th"]);
    }
}
