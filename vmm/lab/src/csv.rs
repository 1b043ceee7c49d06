//! Comma-separated values (RFC 4180): a field holding a comma, a quote or a
//! line break is quoted, its quotes doubled.

/// One record: the fields joined by commas, quoted where needed, ending in
/// a newline.
pub fn record<S: AsRef<str>>(fields: &[S]) -> String {
    let mut line = fields.iter().map(|f| field(f.as_ref())).collect::<Vec<_>>().join(",");
    line.push('\n');
    line
}

fn field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

/// A number as CSV writes it: integers without a fraction, others as Rust
/// prints the f64 (enough digits to read it back exactly).
pub fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        v.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_that_need_it_are_quoted() {
        assert_eq!(
            record(&["a", "read every page, write every 8th", "say \"hi\""]),
            "a,\"read every page, write every 8th\",\"say \"\"hi\"\"\"\n"
        );
        assert_eq!(number(3.0), "3");
        assert_eq!(number(2.5), "2.5");
    }
}
