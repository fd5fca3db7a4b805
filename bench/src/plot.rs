//! The suite's plot: pause time and checkpoint throughput against state
//! size, each with its same-run baseline, as one SVG (plotters, SVG backend
//! only: no font or image dependencies).

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use thiserror::Error;

use crate::suite::SuiteReport;

const MIB: f64 = (1u64 << 20) as f64;

/// Drawing the plot failed.
#[derive(Debug, Error)]
#[error("plotting {}: {message}", path.display())]
pub struct PlotError {
    /// The SVG file.
    pub path: PathBuf,
    /// What plotters said (its error type is generic over the backend).
    pub message: String,
}

/// Writes the two panels of `report` to `path`.
pub fn write_svg(report: &SuiteReport, path: &Path) -> Result<(), PlotError> {
    let err = |e: &dyn std::fmt::Display| PlotError {
        path: path.to_owned(),
        message: e.to_string(),
    };
    let root = SVGBackend::new(path, (1000, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (left, right) = root.split_horizontally(500);

    let sizes = &report.sizes;
    let x_max = sizes
        .iter()
        .map(|r| r.size as f64 / MIB)
        .fold(1.0, f64::max)
        * 1.05;
    let ms = |ns: u64| ns as f64 / 1e6;

    // Left: the job-visible pause against memcpy of the same bytes.
    let pause: Vec<(f64, f64)> = sizes
        .iter()
        .map(|r| {
            (
                r.size as f64 / MIB,
                ms(r.pause_ns.iter().copied().max().unwrap_or(0)),
            )
        })
        .collect();
    let memcpy: Vec<(f64, f64)> = sizes
        .iter()
        .map(|r| (r.size as f64 / MIB, ms(r.node_memcpy_ns)))
        .collect();
    let y_max = pause.iter().chain(&memcpy).map(|p| p.1).fold(1.0, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(&left)
        .caption("pause per checkpoint (1 rank)", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("state size (MiB)")
        .y_desc("ms")
        .draw()
        .map_err(|e| err(&e))?;
    for (points, color, label) in [
        (&pause, &RED, "cryo pause"),
        (&memcpy, &BLUE, "memcpy, same bytes"),
    ] {
        chart
            .draw_series(LineSeries::new(points.iter().copied(), color))
            .map_err(|e| err(&e))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart
            .draw_series(points.iter().map(|p| Circle::new(*p, 3, color.filled())))
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| err(&e))?;

    // Right: end-to-end throughput (raw bytes per second) against zstd.
    let gbps = |bytes: u64, ns: u64| bytes as f64 / ns.max(1) as f64;
    let cryo: Vec<(f64, f64)> = sizes
        .iter()
        .map(|r| (r.size as f64 / MIB, gbps(r.raw_bytes, r.checkpoint_ns)))
        .collect();
    let zstd: Vec<(f64, f64)> = sizes
        .iter()
        .filter_map(|r| Some((r.size as f64 / MIB, gbps(r.raw_bytes, r.zstd_ns?))))
        .collect();
    let restart: Vec<(f64, f64)> = sizes
        .iter()
        .map(|r| (r.size as f64 / MIB, gbps(r.raw_bytes, r.restart_ns)))
        .collect();
    let zstd_d: Vec<(f64, f64)> = sizes
        .iter()
        .filter_map(|r| Some((r.size as f64 / MIB, gbps(r.raw_bytes, r.zstd_d_ns?))))
        .collect();
    let y_max = cryo
        .iter()
        .chain(&zstd)
        .chain(&restart)
        .chain(&zstd_d)
        .map(|p| p.1)
        .fold(0.1, f64::max)
        * 1.3;
    let mut chart = ChartBuilder::on(&right)
        .caption("throughput (1 rank)", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("state size (MiB)")
        .y_desc("GB/s of state")
        .draw()
        .map_err(|e| err(&e))?;
    let green = RGBColor(0, 140, 0);
    let grey = RGBColor(120, 120, 120);
    for (points, color, label) in [
        (&cryo, RED, "cryo checkpoint (to commit)"),
        (&zstd, BLUE, "zstd -1 -T0, same bytes"),
        (&restart, green, "cryo restart"),
        (&zstd_d, grey, "zstd -d -T0, same bytes"),
    ] {
        chart
            .draw_series(LineSeries::new(points.iter().copied(), color))
            .map_err(|e| err(&e))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart
            .draw_series(
                points
                    .iter()
                    .map(move |p| Circle::new(*p, 3, color.filled())),
            )
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
