//! The timeline as an SVG: goodput, p99 latency and staleness per second, one panel each, with
//! every window shaded and named.

use std::fmt::Write;

use crate::report::Report;

const WIDTH: f64 = 1200.0;
const PANEL: f64 = 160.0;
const LEFT: f64 = 70.0;
const TOP: f64 = 30.0;

/// Renders the report's timeline.
pub fn timeline(report: &Report) -> String {
    let seconds = report.timeline.len().max(1) as f64;
    let x = |second: f64| LEFT + second / seconds * (WIDTH - LEFT - 20.0);
    let panels: [(&str, Vec<f64>); 3] = [
        (
            "goodput %",
            report
                .timeline
                .iter()
                .map(|s| {
                    if s.offered == 0 {
                        100.0
                    } else {
                        100.0 * s.good as f64 / s.offered as f64
                    }
                })
                .collect(),
        ),
        ("p99 ms", report.timeline.iter().map(|s| s.p99_ms).collect()),
        (
            "max staleness ms",
            report.timeline.iter().map(|s| s.max_staleness_ms).collect(),
        ),
    ];
    let height = TOP + panels.len() as f64 * (PANEL + 30.0) + 20.0;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = write!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (i, window) in report.windows.iter().enumerate() {
        let (x0, x1) = (x(window.start_s), x(window.end_s));
        let shade = if i % 2 == 0 { "#f0f4ff" } else { "#fff6e8" };
        let _ = write!(
            svg,
            r##"<rect x="{x0:.1}" y="{TOP}" width="{:.1}" height="{:.1}" fill="{shade}"/><text x="{:.1}" y="{:.1}" transform="rotate(-90 {:.1} {:.1})" fill="#555">{}</text>"##,
            x1 - x0,
            height - TOP - 20.0,
            x0 + 12.0,
            height - 30.0,
            x0 + 12.0,
            height - 30.0,
            escape(&window.name),
        );
    }
    for (panel, (label, values)) in panels.iter().enumerate() {
        let top = TOP + panel as f64 * (PANEL + 30.0);
        let max = values.iter().copied().fold(1.0_f64, f64::max);
        let y = |value: f64| top + PANEL - value / max * PANEL;
        let _ = write!(
            svg,
            r##"<line x1="{LEFT}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#999"/><text x="4" y="{:.1}">{label}</text><text x="4" y="{:.1}">{max:.0}</text>"##,
            top + PANEL,
            WIDTH - 20.0,
            top + PANEL,
            top + PANEL / 2.0,
            top + 10.0,
        );
        let points: Vec<String> = values
            .iter()
            .enumerate()
            .map(|(second, value)| format!("{:.1},{:.1}", x(second as f64 + 0.5), y(*value)))
            .collect();
        let _ = write!(
            svg,
            r##"<polyline fill="none" stroke="#1f4e9c" stroke-width="1.5" points="{}"/>"##,
            points.join(" ")
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
