//! What a dashboard shows of a queue: counts by outcome, depth and age.

mod support;

use std::time::Duration;

use bytes::Bytes;
use headroom_core::BackendErrorKind;
use headroom_core::memory::MemoryJobStore;
use headroom_jobs::{Job, JobError, JobQueue, JobState};
use metrics_exporter_prometheus::PrometheusBuilder;
use support::{Call, Fault, Faults};

fn value(rendered: &str, series: &str) -> Option<f64> {
    rendered
        .lines()
        .find(|line| line.starts_with(series) && line[series.len()..].starts_with(' '))
        .map(|line| line[series.len()..].trim().parse().unwrap())
}

#[test]
fn outcomes_depth_and_oldest_age_are_metrics() {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let queue = metrics::with_local_recorder(&recorder, || {
        JobQueue::builder("mail", MemoryJobStore::new())
            .max_len(5)
            .build()
            .unwrap()
    });
    support::current_thread().block_on(async {
        let mut ids = Vec::new();
        for payload in ["ok", "ok", "fail", "fatal", "ok"] {
            ids.push(queue.enqueue(Job::new(payload)).await.unwrap().id);
        }
        assert!(queue.enqueue(Job::new("over")).await.is_err());
        tokio::time::sleep(Duration::from_secs(3)).await;
        queue.publish_stats().await.unwrap();
        let rendered = handle.render();
        assert_eq!(
            value(&rendered, r#"headroom_jobs_depth{queue="mail"}"#),
            Some(5.0)
        );
        assert_eq!(
            value(&rendered, r#"headroom_jobs_ready{queue="mail"}"#),
            Some(5.0)
        );
        assert_eq!(
            value(
                &rendered,
                r#"headroom_jobs_oldest_ready_age_seconds{queue="mail"}"#
            ),
            Some(3.0)
        );

        let worker = queue
            .worker(|job| async move {
                match &job.payload()[..] {
                    b"fail" if job.attempt() == 1 => Err(JobError::retry("try again")),
                    b"fatal" => Err(JobError::fatal("no such address")),
                    _ => Ok(Bytes::new()),
                }
            })
            .backoff(Duration::from_millis(100), 2.0, Duration::from_secs(1))
            .start()
            .unwrap();
        for id in &ids {
            while !matches!(
                queue.status(*id).await.unwrap().unwrap().state,
                JobState::Done | JobState::Dead
            ) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        worker.shutdown(Duration::from_secs(1)).await;
        queue.publish_stats().await.unwrap();
    });
    let rendered = handle.render();
    let series = |name: &str, outcome: &str| {
        value(
            &rendered,
            &format!(r#"{name}{{queue="mail",outcome="{outcome}"}}"#),
        )
    };
    assert_eq!(series("headroom_jobs_enqueued_total", "added"), Some(5.0));
    assert_eq!(series("headroom_jobs_enqueued_total", "full"), Some(1.0));
    assert_eq!(series("headroom_jobs_attempts_total", "done"), Some(4.0));
    assert_eq!(series("headroom_jobs_attempts_total", "retried"), Some(1.0));
    assert_eq!(series("headroom_jobs_attempts_total", "dead"), Some(1.0));
    assert_eq!(
        value(&rendered, r#"headroom_jobs_depth{queue="mail"}"#),
        Some(0.0)
    );
    assert_eq!(
        value(&rendered, r#"headroom_jobs_dead{queue="mail"}"#),
        Some(1.0)
    );
    assert_eq!(
        value(&rendered, r#"headroom_jobs_running{queue="mail"}"#),
        Some(0.0)
    );
    assert_eq!(
        value(
            &rendered,
            r#"headroom_jobs_duration_seconds_count{queue="mail"}"#
        ),
        Some(6.0)
    );
}

#[test]
fn a_job_buried_on_delivery_is_counted_dead() {
    use headroom_core::jobs::{FetchRequest, JobStore};

    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let store = MemoryJobStore::new();
    let queue = metrics::with_local_recorder(&recorder, || {
        JobQueue::builder("poison", store.clone()).build().unwrap()
    });
    support::current_thread().block_on(async {
        let id = queue
            .enqueue(Job::new("kills its worker"))
            .await
            .unwrap()
            .id;
        // Its only allowed attempt went to a worker that died.
        let partition = headroom_core::Namespace::new("headroom.jobs")
            .unwrap()
            .key("{poison.0}")
            .unwrap();
        let request = FetchRequest {
            consumer: "died",
            lanes: &[0],
            max: 1,
            visibility: Duration::from_secs(1),
        };
        assert_eq!(store.fetch(&partition, request).await.unwrap().len(), 1);
        let worker = queue
            .worker(|_| async { Ok(Bytes::new()) })
            .max_attempts(1)
            .visibility(Duration::from_secs(1))
            .start()
            .unwrap();
        while queue.status(id).await.unwrap().unwrap().state != JobState::Dead {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let report = worker.shutdown(Duration::from_secs(1)).await;
        assert_eq!(report.dead, 1);
    });
    let rendered = handle.render();
    assert_eq!(
        value(
            &rendered,
            r#"headroom_jobs_attempts_total{queue="poison",outcome="dead"}"#
        ),
        Some(1.0)
    );
}

#[test]
fn the_depth_gauge_follows_the_queue_while_every_handler_is_busy() {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let queue = metrics::with_local_recorder(&recorder, || {
        JobQueue::builder("busy", MemoryJobStore::new())
            .build()
            .unwrap()
    });
    support::current_thread().block_on(async {
        let worker = queue
            .worker(|_| async {
                tokio::time::sleep(Duration::from_secs(120)).await;
                Ok(Bytes::new())
            })
            .concurrency(2)
            .prefetch(0)
            .start()
            .unwrap();
        for _ in 0..60 {
            for _ in 0..10 {
                queue.enqueue(Job::new("slow")).await.unwrap();
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        tokio::time::sleep(Duration::from_secs(6)).await;
        let rendered = handle.render();
        let depth = value(&rendered, r#"headroom_jobs_depth{queue="busy"}"#).unwrap();
        assert_eq!(
            depth, 600.0,
            "the depth gauge stood still while the handlers were busy"
        );
        let age = value(
            &rendered,
            r#"headroom_jobs_oldest_ready_age_seconds{queue="busy"}"#,
        )
        .unwrap();
        assert!(age >= 60.0, "oldest ready age {age}");
        worker.shutdown(Duration::ZERO).await;
    });
}

/// One partition whose counts cannot be read (its cluster master out of reach) freezes no
/// gauge: the readable partitions' counts are published, with the unreadable one's last
/// reading (its oldest ready job ageing on), and the failed read answers its error.
#[test]
fn the_gauges_follow_the_readable_partitions_while_one_cannot_be_read() {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let store = Faults::default();
    let queue = metrics::with_local_recorder(&recorder, || {
        JobQueue::builder("split", store.clone())
            .partitions(2)
            .build()
            .unwrap()
    });
    let gauge = |name: &str| {
        value(&handle.render(), &format!(r#"{name}{{queue="split"}}"#)).unwrap_or(f64::NAN)
    };
    support::current_thread().block_on(async {
        // Jobs without a route or tenant go round the partitions, from partition 0.
        queue.enqueue(Job::new("early")).await.unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        queue.publish_stats().await.unwrap();
        assert_eq!(gauge("headroom_jobs_depth"), 1.0);

        // Its cluster master out of reach: reading its counts fails at once.
        store.inject(
            &[Call::Stats],
            Some("{split.0}"),
            Fault::Fail(BackendErrorKind::Connection),
            None,
        );
        // Fifty in each partition.
        for _ in 0..100 {
            queue.enqueue(Job::new("late")).await.unwrap();
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(queue.publish_stats().await.is_err(), "a partition is down");
        // Partition 1 as it is now (50, the oldest 10 s old), partition 0 as last read (1,
        // enqueued 13 s ago).
        assert_eq!(gauge("headroom_jobs_depth"), 51.0);
        assert_eq!(gauge("headroom_jobs_ready"), 51.0);
        assert_eq!(gauge("headroom_jobs_oldest_ready_age_seconds"), 13.0);
    });
}
