//! Every injection is counted per strategy, spared calls and stops are counted, and the running
//! gauge follows the experiment: what a dashboard shows beside what broke.

use std::time::Duration;

use futures_util::FutureExt;
use headroom_chaos::{Chaos, Delay, Experiment, ExperimentConfig};
use metrics_exporter_prometheus::PrometheusBuilder;

fn line<'a>(rendered: &'a str, series: &str) -> Option<&'a str> {
    rendered
        .lines()
        .find(|line| line.starts_with(series))
        .map(|line| line[series.len()..].trim())
}

#[test]
fn injections_spares_stops_and_the_running_gauge_are_recorded() {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::with_local_recorder(&recorder, || {
        let experiment = Experiment::builder("recorded").seed(1).build().unwrap();
        let chaos = Chaos::<u32, &str>::new(experiment.clone())
            .fault(|| "injected")
            .outcome(|| 0);
        experiment
            .start(
                ExperimentConfig::new(Duration::from_secs(60))
                    .latency(1.0, Delay::Fixed(Duration::ZERO))
                    .fault(1.0)
                    .max_fraction(0.5),
            )
            .unwrap();
        let rendered = handle.render();
        assert_eq!(
            line(
                &rendered,
                r#"headroom_chaos_running{experiment="recorded"}"#
            ),
            Some("1")
        );
        for _ in 0..100 {
            let _ = chaos.call(async { Ok(1) }).now_or_never();
        }
        experiment.stop();
    });
    let rendered = handle.render();
    let series = |strategy: &str| {
        format!(r#"headroom_chaos_injected_total{{experiment="recorded",strategy="{strategy}"}}"#)
    };
    assert_eq!(
        line(&rendered, &series("latency")),
        Some("50"),
        "{rendered}"
    );
    assert_eq!(line(&rendered, &series("fault")), Some("50"));
    assert_eq!(line(&rendered, &series("outcome")), Some("0"));
    assert_eq!(
        line(
            &rendered,
            r#"headroom_chaos_spared_total{experiment="recorded"}"#
        ),
        Some("50")
    );
    assert_eq!(
        line(
            &rendered,
            r#"headroom_chaos_stops_total{experiment="recorded",reason="manual"}"#
        ),
        Some("1")
    );
    assert_eq!(
        line(
            &rendered,
            r#"headroom_chaos_running{experiment="recorded"}"#
        ),
        Some("0")
    );
}
