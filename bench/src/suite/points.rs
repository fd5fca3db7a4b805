//! The safe points a rank logged under `quiesce-bench --points-log`: how
//! many it passed from a checkpoint request to its park, and how long the
//! parking one held the application (the pause as the application saw it).

/// One safe point: its start (Unix ns), its length (ns), and the epoch it
/// checkpointed (0 for none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Point {
    start_ns: u128,
    len_ns: u128,
    epoch: u64,
}

/// Parses a log; a line that is not three numbers is named in the error.
/// A last line without its newline was cut short by the rank's end (a
/// preempted job is killed) and is left out.
pub(super) fn parse(text: &str) -> Result<Vec<Point>, String> {
    let complete = match text.rfind('\n') {
        Some(end) => &text[..=end],
        None => "",
    };
    complete
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            let mut fields = line.split_whitespace();
            let mut next = || fields.next().and_then(|f| f.parse::<u128>().ok());
            match (next(), next(), next(), fields.next()) {
                (Some(start_ns), Some(len_ns), Some(epoch), None) => Ok(Point {
                    start_ns,
                    len_ns,
                    epoch: u64::try_from(epoch).map_err(|_| format!("line {}: epoch", i + 1))?,
                }),
                _ => Err(format!(
                    "line {} is not `start length epoch`: {line:?}",
                    i + 1
                )),
            }
        })
        .collect()
}

/// For the checkpoint of `epoch` requested at `request_ns`: the safe points
/// the rank started from the request up to its park (the parking one
/// included), and the parking one's length in ns. `None` if the rank never
/// parked for it.
pub(super) fn to_park(points: &[Point], request_ns: u128, epoch: u64) -> Option<(u32, u128)> {
    let park = points.iter().position(|p| p.epoch == epoch)?;
    let passed = points[..=park]
        .iter()
        .filter(|p| p.start_ns >= request_ns)
        .count();
    Some((u32::try_from(passed).ok()?, points[park].len_ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log() -> Vec<Point> {
        parse("100 5 0\n200 5 0\n300 5 0\n400 90 1\n500 5 0\n600 7 2\n").unwrap()
    }

    #[test]
    fn counts_the_points_from_the_request_to_the_park() {
        // Requested between the first and second safe point: 200, 300, 400.
        assert_eq!(to_park(&log(), 150, 1), Some((3, 90)));
        // Requested just before the parking one started.
        assert_eq!(to_park(&log(), 400, 1), Some((1, 90)));
        assert_eq!(to_park(&log(), 450, 2), Some((2, 7)));
    }

    #[test]
    fn a_rank_that_never_parked_gives_nothing() {
        assert_eq!(to_park(&log(), 0, 3), None);
    }

    #[test]
    fn a_last_line_cut_short_is_left_out() {
        assert_eq!(parse("1 2 0\n3 4 1\n5 6").unwrap().len(), 2);
        assert_eq!(parse("5 6").unwrap().len(), 0);
    }

    #[test]
    fn malformed_lines_are_named() {
        let err = parse("1 2 0\n1 2\n").unwrap_err();
        assert!(err.contains("line 2"), "{err}");
        assert!(parse("1 2 x\n").is_err());
        assert!(parse("1 2 3 4\n").is_err());
    }
}
