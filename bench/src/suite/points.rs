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

/// For the checkpoint of `epoch`: the time the application lost to it, as
/// the longest gap between the starts of successive safe points from the
/// parking one to `after` iterations later, less the usual gap (the median
/// before the park). This counts what happens after the resume too: the
/// faults on the first writes to each page (write tracking, copies on
/// write under a snapshot). `None` without a park or a usual gap.
pub(super) fn time_lost(points: &[Point], epoch: u64, after: usize) -> Option<u128> {
    let park = points.iter().position(|p| p.epoch == epoch)?;
    let gap = |i: usize| points.get(i + 1)?.start_ns.checked_sub(points[i].start_ns);
    let mut before: Vec<u128> = (0..park).filter_map(gap).collect();
    if before.is_empty() {
        return None;
    }
    before.sort_unstable();
    let usual = before[before.len() / 2];
    let longest = (park..=park + after).filter_map(gap).max()?;
    Some(longest.saturating_sub(usual))
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
    fn the_time_lost_is_the_longest_gap_around_the_park_beyond_the_usual() {
        // Gaps 100, 100, 100 before; the park at 400 holds 90 and the next
        // iteration runs 50 long (faults after the resume): 150 and 120.
        let points =
            parse("100 5 0\n200 5 0\n300 5 0\n400 90 1\n550 5 0\n670 5 0\n770 5 0\n").unwrap();
        assert_eq!(time_lost(&points, 1, 2), Some(50));
        assert_eq!(time_lost(&points, 2, 2), None);
        // No gap before the park to compare with.
        assert_eq!(time_lost(&parse("1 2 1\n5 2 0\n").unwrap(), 1, 2), None);
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
