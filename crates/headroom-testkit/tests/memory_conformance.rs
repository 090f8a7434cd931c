//! The backend conformance suites against the in-memory backends of `headroom-core`.

use headroom_core::memory::{MemoryBus, MemoryKvStore};
use headroom_testkit::conformance::kv::MAX_VALUE_LEN;

headroom_testkit::kv_store_conformance!(memory_kv, async {
    MemoryKvStore::builder()
        .max_value_len(MAX_VALUE_LEN)
        .build()
});

headroom_testkit::bus_conformance!(memory_bus, async { MemoryBus::new() });

headroom_testkit::lease_store_conformance!(memory_lease, async {
    headroom_core::memory::MemoryLeaseStore::new()
});

headroom_testkit::rate_store_conformance!(memory_rate, async {
    headroom_core::memory::MemoryRateStore::new()
});

headroom_testkit::job_store_conformance!(memory_jobs, async {
    headroom_core::memory::MemoryJobStore::new()
});
