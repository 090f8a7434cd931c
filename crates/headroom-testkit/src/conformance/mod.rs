//! Contract tests of the backend traits, shared by every implementation.
//!
//! Each check is a public async function taking the backend under test and a fresh namespace.
//! The macros [`kv_store_conformance!`](crate::kv_store_conformance),
//! [`bus_conformance!`](crate::bus_conformance),
//! [`lease_store_conformance!`](crate::lease_store_conformance),
//! [`rate_store_conformance!`](crate::rate_store_conformance) and
//! [`job_store_conformance!`](crate::job_store_conformance) expand to one `#[tokio::test]` per check, so a
//! backend crate runs the whole suite with one line per backend:
//!
//! ```text
//! headroom_testkit::kv_store_conformance!(memory, async {
//!     headroom_core::memory::MemoryKvStore::builder().max_value_len(1 << 20).build()
//! });
//! ```
//!
//! Stores given to the KV suite must accept values of up to [`kv::MAX_VALUE_LEN`] bytes and
//! refuse larger ones.

pub mod bus;
pub mod jobs;
pub mod kv;
pub mod lease;
pub mod migration;
pub mod rate;

/// Expands to one test per KV store check, each in a module named `$name`.
///
/// `$make` is an expression of a future that yields a fresh store; it runs once per test.
#[macro_export]
macro_rules! kv_store_conformance {
    ($name:ident, $make:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $crate::kv_store_conformance!(@tests $make;
                values_round_trip_unchanged,
                missing_keys_read_as_none,
                set_overwrites,
                entries_expire_after_their_ttl,
                ttls_outside_what_the_store_keeps_are_refused,
                oversized_values_are_refused_and_not_written,
                get_many_answers_in_order_with_duplicates,
                set_many_writes_every_entry,
                delete_counts_existing_keys,
                namespaces_do_not_collide,
                concurrent_writers_and_readers_agree,
                set_if_newer_never_replaces_a_newer_value,
                set_if_newer_breaks_a_tie_by_the_second_field,
                set_if_newer_replaces_a_held_value_without_the_marker,
                delete_if_eq_deletes_only_the_expected_bytes,
            );
        }
    };
    (@tests $make:expr; $($check:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let store = $make.await;
                $crate::conformance::kv::$check(&store, $crate::unique_namespace(stringify!($check))).await;
            }
        )+
    };
}

/// Expands to one test per invalidation bus check, each in a module named `$name`.
///
/// `$make` is an expression of a future that yields a fresh bus; it runs once per test.
#[macro_export]
macro_rules! bus_conformance {
    ($name:ident, $make:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $crate::bus_conformance!(@tests $make;
                subscription_goes_live_then_receives_in_order,
                every_subscriber_receives_every_message,
                publishing_without_subscribers_succeeds,
                channels_are_separate,
                dropped_subscription_does_not_disturb_others,
                channel_subscribed_again_after_its_last_subscription_dropped,
            );
        }
    };
    (@tests $make:expr; $($check:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let bus = $make.await;
                $crate::conformance::bus::$check(&bus, $crate::unique_namespace(stringify!($check))).await;
            }
        )+
    };
}

/// Expands to one test per lease store check, each in a module named `$name`.
///
/// `$make` is an expression of a future that yields a fresh store; it runs once per test. The
/// store must run on real time (its own clock), since some checks wait for short leases to
/// expire.
#[macro_export]
macro_rules! lease_store_conformance {
    ($name:ident, $make:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $crate::lease_store_conformance!(@tests $make;
                first_begin_acquires_and_the_next_sees_it_in_progress,
                a_begin_sent_again_by_its_id_answers_its_token,
                release_begun_releases_only_that_begins_lease,
                a_begin_that_reaches_the_store_after_its_release_takes_nothing,
                completed_outcome_is_replayed,
                a_completion_repeated_by_its_holder_is_applied,
                foreign_tokens_are_rejected,
                released_lease_can_be_taken_again_with_a_greater_token,
                expired_lease_is_taken_over_and_the_old_holder_fenced,
                an_expired_lease_is_taken_over_only_with_its_fingerprint,
                holder_extends_its_lease,
                a_holder_past_its_lease_runs_on_while_nobody_took_over,
                completed_record_expires_after_retention,
                concurrent_begins_acquire_exactly_once,
                keys_are_independent,
                durations_outside_what_the_store_keeps_are_refused,
            );
        }
    };
    (@tests $make:expr; $($check:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let store = $make.await;
                $crate::conformance::lease::$check(&store, $crate::unique_namespace(stringify!($check))).await;
            }
        )+
    };
}

/// Expands to one test per rate store check, each in a module named `$name`.
///
/// `$make` is an expression of a future that yields a fresh store; it runs once per test.
#[macro_export]
macro_rules! rate_store_conformance {
    ($name:ident, $make:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $crate::rate_store_conformance!(@tests $make;
                admits_exactly_the_burst,
                costs_spend_several_units,
                a_cost_of_zero_is_admitted_and_spends_nothing,
                impossible_costs_are_refused,
                keys_are_independent,
                concurrent_requests_admit_exactly_the_burst,
                units_replenish_over_time,
                several_cells_are_charged_together_or_not_at_all,
                a_refusal_waits_for_the_longest_of_the_cells,
                impossible_combined_decisions_are_refused,
                concurrent_requests_on_several_cells_admit_exactly_the_smallest_burst,
            );
        }
    };
    (@tests $make:expr; $($check:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let store = $make.await;
                $crate::conformance::rate::$check(&store, $crate::unique_namespace(stringify!($check))).await;
            }
        )+
    };
}

/// Expands to one test per job store check, each in a module named `$name`.
///
/// `$make` is an expression of a future that yields a fresh store; it runs once per test. The
/// store must run on real time (its own clock), since some checks wait for short delays,
/// visibility timeouts and retentions.
#[macro_export]
macro_rules! job_store_conformance {
    ($name:ident, $make:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $crate::job_store_conformance!(@tests $make;
                jobs_round_trip_through_their_states,
                numbers_grow_and_partitions_are_apart,
                enqueue_never_passes_the_bound_under_concurrency,
                a_tenant_at_its_bound_is_refused_alone,
                a_duplicate_returns_the_first_number_even_when_full,
                a_dedup_key_is_forgotten_after_its_window,
                a_refusal_carries_the_drain_rate,
                lanes_are_read_in_the_order_asked,
                a_delayed_job_waits_for_its_delay,
                an_expired_visibility_is_taken_over_and_the_old_holder_fenced,
                a_delivery_is_kept_for_its_holders_visibility_whatever_the_fetchers,
                a_lapsed_delivery_is_taken_over_behind_longer_holds,
                extending_keeps_the_job,
                a_lost_fetch_is_recovered_as_it_was,
                a_retried_job_comes_back_after_its_delay,
                a_released_job_comes_back_at_once_uncharged,
                a_hand_back_keeps_the_error_of_the_last_failed_attempt,
                a_buried_job_is_a_dead_letter_and_frees_its_place,
                the_newest_job_of_a_subject_is_found_while_unfinished,
                a_lower_ranked_job_does_not_replace_its_subjects_newest,
                finished_records_go_after_their_retention,
                steps_on_unknown_jobs_are_rejected,
                stats_count_each_state,
                concurrent_consumers_get_each_job_once,
                complete_many_finishes_each_job_as_complete_would,
                random_steps_lose_no_job_and_finish_each_once,
            );
        }
    };
    (@tests $make:expr; $($check:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let store = $make.await;
                $crate::conformance::jobs::$check(&store, $crate::unique_namespace(stringify!($check))).await;
            }
        )+
    };
}
