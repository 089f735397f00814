//! Figures as people read them: `2h 05m`, `6.2 MiB`, `-` for a missing one.

use serde_json::Value;

/// A JSON number as `f64`, absent or `null` as `None`.
pub(crate) fn number(value: &Value) -> Option<f64> {
    value.as_f64()
}

pub(crate) fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

pub(crate) fn uptime(value: &Value) -> String {
    let Some(seconds) = number(value) else {
        return "-".to_owned();
    };
    let seconds = seconds.max(0.0) as u64;
    match seconds {
        0..=59 => format!("{seconds}s"),
        60..=3599 => format!("{}m {:02}s", seconds / 60, seconds % 60),
        3600..=86399 => format!("{}h {:02}m", seconds / 3600, seconds % 3600 / 60),
        _ => format!("{}d {:02}h", seconds / 86400, seconds % 86400 / 3600),
    }
}

pub(crate) fn bytes(value: &Value) -> String {
    let Some(bytes) = number(value) else {
        return "-".to_owned();
    };
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut amount = bytes;
    let mut unit = 0;
    while amount >= 1024.0 && unit < UNITS.len() - 1 {
        amount /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{amount:.0} B")
    } else {
        format!("{amount:.1} {}", UNITS[unit])
    }
}

/// A figure with `decimals` places, or `-`.
pub(crate) fn fixed(value: &Value, decimals: usize) -> String {
    match number(value) {
        Some(figure) => format!("{figure:.decimals$}"),
        None => "-".to_owned(),
    }
}

/// Left-aligned columns, two spaces apart; columns listed in `right` are
/// right-aligned (numbers).
pub(crate) fn table(header: &[&str], rows: &[Vec<String>], right: &[usize]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (column, cell) in row.iter().enumerate() {
            widths[column] = widths[column].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (column, cell) in cells.iter().enumerate() {
            let pad = widths[column] - cell.chars().count();
            if column > 0 {
                out.push_str("  ");
            }
            if right.contains(&column) {
                out.push_str(&" ".repeat(pad));
                out.push_str(cell);
            } else {
                out.push_str(cell);
                if column + 1 < cells.len() {
                    out.push_str(&" ".repeat(pad));
                }
            }
        }
        out.push('\n');
        out
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn figures_read_well() {
        assert_eq!(uptime(&json!(12.5)), "12s");
        assert_eq!(uptime(&json!(7500)), "2h 05m");
        assert_eq!(uptime(&json!(null)), "-");
        assert_eq!(bytes(&json!(6553600)), "6.2 MiB");
        assert_eq!(bytes(&json!(512)), "512 B");
        assert_eq!(fixed(&json!(1.234), 1), "1.2");
        assert_eq!(text(&json!("killed by signal 9")), "killed by signal 9");
        assert_eq!(text(&json!(null)), "-");
    }

    #[test]
    fn tables_align() {
        let out = table(
            &["SLOT", "STATE"],
            &[
                vec!["0".into(), "ready".into()],
                vec!["10".into(), "draining".into()],
            ],
            &[0],
        );
        assert_eq!(out, "SLOT  STATE\n   0  ready\n  10  draining\n");
    }
}
