//! Human-readable sizes, rates, times and errors for command output.

/// `1536` → `1.5 KiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// "rank 3" or "ranks 0-3,6", for the job's opening line.
pub fn rank_range(ranks: &[u32]) -> String {
    let listed = cryo_core::protocol::render_ranks(ranks);
    if ranks.len() == 1 {
        format!("rank {listed}")
    } else {
        format!("ranks {listed}")
    }
}

/// "rank 3", "ranks 0, 1", "ranks 0, 1, 2, 3 and 60 more".
pub fn ranks(ranks: &[u32]) -> String {
    const SHOWN: usize = 4;
    let listed: Vec<String> = ranks.iter().take(SHOWN).map(u32::to_string).collect();
    let more = match ranks.len().saturating_sub(SHOWN) {
        0 => String::new(),
        n => format!(" and {n} more"),
    };
    let noun = if ranks.len() == 1 { "rank" } else { "ranks" };
    format!("{noun} {}{more}", listed.join(", "))
}

/// Bytes per second in decimal units, as storage vendors quote, with the
/// unit chosen so that small rates never print as `0.00 GB/s`.
pub fn rate(bytes: u64, seconds: f64) -> String {
    if seconds <= 0.0 || !seconds.is_finite() {
        return "-".into();
    }
    let per_second = bytes as f64 / seconds;
    let (value, unit) = if per_second >= 1e9 {
        (per_second / 1e9, "GB/s")
    } else if per_second >= 1e6 {
        (per_second / 1e6, "MB/s")
    } else if per_second >= 1e3 {
        (per_second / 1e3, "kB/s")
    } else {
        (per_second, "B/s")
    };
    format!("{value:.2} {unit}")
}

/// Milliseconds since the Unix epoch as `YYYY-MM-DD HH:MM:SSZ`.
pub fn utc(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Parses `512M`, `1GiB`, `4096`, `2g` into bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size (try 512M, 4GiB, 65536)"))?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => return Err(format!("unknown size unit {other:?} in {text:?}")),
    };
    let value = number * factor as f64;
    if !value.is_finite() || value < 0.0 || value > u64::MAX as f64 {
        return Err(format!("size {text:?} is out of range"));
    }
    // Truncation is intended: sizes are whole bytes.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok(value as u64)
}

/// An error and its causes, outermost first, joined by `: `, each said
/// once (`cryo_core::error_chain`).
pub fn error_chain(err: &anyhow::Error) -> String {
    cryo_core::error_chain::error_chain(err.as_ref())
}

/// A chunk size within the format's limits.
pub fn parse_chunk_size(text: &str) -> Result<u64, String> {
    use cryo_core::format::limits::{MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
    let size = parse_size(text)?;
    if !(MIN_CHUNK_SIZE as u64..=MAX_CHUNK_SIZE as u64).contains(&size) {
        return Err(format!(
            "{text:?} is outside the chunk sizes a store holds: {} to {}",
            bytes(MIN_CHUNK_SIZE as u64),
            bytes(MAX_CHUNK_SIZE as u64)
        ));
    }
    Ok(size)
}

/// The longest duration an option takes: a year.
const LONGEST_SECS: f64 = 365.0 * 86_400.0;

/// A duration option (`what`) in seconds: positive, finite, at most a
/// year.
pub fn seconds(value: f64, what: &str) -> anyhow::Result<std::time::Duration> {
    if !value.is_finite() || value <= 0.0 {
        anyhow::bail!("{what} must be a positive number of seconds, not {value}");
    }
    if value > LONGEST_SECS {
        anyhow::bail!("{what} {value} is too long: at most {LONGEST_SECS} seconds (a year)");
    }
    Ok(std::time::Duration::from_secs_f64(value))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("create directory /st: {source}")]
    struct Step {
        #[source]
        source: std::io::Error,
    }

    #[test]
    fn durations_and_chunk_sizes_out_of_range_are_refused() {
        assert_eq!(seconds(2.5, "--interval").unwrap().as_millis(), 2500);
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e20] {
            let err = seconds(bad, "--interval").unwrap_err().to_string();
            assert!(err.starts_with("--interval"), "{err}");
        }
        assert_eq!(parse_chunk_size("1MiB"), Ok(1 << 20));
        for bad in ["0", "1", "1TiB"] {
            let err = parse_chunk_size(bad).unwrap_err();
            assert!(err.contains("outside the chunk sizes"), "{err}");
        }
    }

    #[test]
    fn an_error_that_shows_its_source_says_it_once() {
        let io = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let said = io.to_string();
        let err = anyhow::Error::new(Step { source: io }).context("opening the store");
        assert_eq!(
            error_chain(&err),
            format!("opening the store: create directory /st: {said}")
        );
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(error_chain(&plain), "outer: inner");
    }

    #[test]
    fn rates_pick_a_unit_that_shows_them() {
        assert_eq!(rate(19 << 20, 7.2), "2.77 MB/s");
        assert_eq!(rate(1 << 30, 0.1), "10.74 GB/s");
        assert_eq!(rate(500, 1.0), "500.00 B/s");
        assert_eq!(rate(1, 0.0), "-");
    }

    #[test]
    fn formats() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(utc(0), "1970-01-01 00:00:00Z");
        assert_eq!(utc(1_795_000_000_000), "2026-11-18 11:06:40Z");
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("0.5k"), Ok(512));
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("").is_err());
    }
}
