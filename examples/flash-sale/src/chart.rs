//! The SVG chart: p99 latency and goodput over time, both runs on the same axes.

use std::path::Path;
use std::time::Duration;

use plotters::prelude::*;

use crate::load::Plan;
use crate::report::{Run, SLO, percentile};

/// One point: time in seconds, p99 in ms, goodput per second.
type Point = (f64, f64, f64);
/// Picks the value a panel shows.
type Pick = fn(&Point) -> f64;

/// The latency axis stops here, so the protected run's line stays readable next to a collapse
/// measured in seconds; higher values are drawn at the top.
const LATENCY_AXIS_MS: f64 = 1_200.0;

/// Width of one point of the chart.
const BUCKET: Duration = Duration::from_millis(500);

/// (time, p99 in ms, goodput per second) for each bucket of `run`.
fn series(run: &Run, plan: &Plan) -> Vec<Point> {
    let buckets = (plan.total().as_secs_f64() / BUCKET.as_secs_f64()).ceil() as usize;
    let mut latencies = vec![Vec::new(); buckets];
    let mut good = vec![0_u32; buckets];
    for sample in &run.samples {
        let i = ((sample.at.as_secs_f64() / BUCKET.as_secs_f64()) as usize).min(buckets - 1);
        latencies[i].push(sample.latency);
        if sample.outcome.is_success() && sample.latency <= SLO {
            good[i] += 1;
        }
    }
    latencies
        .iter_mut()
        .zip(good)
        .enumerate()
        .map(|(i, (bucket, good))| {
            bucket.sort_unstable();
            let t = (i as f64 + 0.5) * BUCKET.as_secs_f64();
            let p99 = percentile(bucket, 0.99).as_secs_f64() * 1000.0;
            (t, p99, f64::from(good) / BUCKET.as_secs_f64())
        })
        .collect()
}

/// Draws the chart into `path`.
pub(crate) fn draw(
    path: &Path,
    plan: &Plan,
    runs: [&Run; 2],
) -> Result<(), Box<dyn std::error::Error>> {
    let data: Vec<_> = runs.iter().map(|run| series(run, plan)).collect();
    let total = plan.total().as_secs_f64();
    let max_p99 = data.iter().flatten().map(|p| p.1).fold(100.0_f64, f64::max);
    let max_good = data.iter().flatten().map(|p| p.2).fold(10.0_f64, f64::max);
    let phases = plan
        .phases
        .iter()
        .map(|p| format!("{} {}x", p.name, p.multiplier))
        .collect::<Vec<_>>()
        .join(", ");
    let colors = [RGBColor(214, 39, 40), RGBColor(31, 119, 180)];

    let root = SVGBackend::new(path, (1000, 720)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((2, 1));
    let charts: [(&str, f64, Pick); 2] = [
        (
            "p99 latency (ms, axis clipped at 1200)",
            (max_p99 * 1.1).min(LATENCY_AXIS_MS),
            |p| p.1.min(LATENCY_AXIS_MS),
        ),
        ("goodput (requests/s within the SLO)", max_good * 1.1, |p| {
            p.2
        }),
    ];
    for (panel, (title, y_max, pick)) in panels.iter().zip(charts) {
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..total, 0.0..y_max)?;
        chart
            .configure_mesh()
            .x_desc(format!("seconds; phases: {phases}"))
            .draw()?;
        // Phase boundaries.
        let mut end = 0.0;
        for phase in &plan.phases[..plan.phases.len() - 1] {
            end += phase.duration.as_secs_f64();
            chart.draw_series(LineSeries::new([(end, 0.0), (end, y_max)], BLACK.mix(0.3)))?;
        }
        for ((run, points), color) in runs.iter().zip(&data).zip(colors) {
            chart
                .draw_series(LineSeries::new(
                    points.iter().map(|p| (p.0, pick(p))),
                    color.stroke_width(2),
                ))?
                .label(run.label)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}
