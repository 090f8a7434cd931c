//! The migration store conformance suite against the in-memory store of `headroom-core`.

headroom_testkit::migration_store_conformance!(memory_migration, async {
    headroom_core::memory::MemoryMigrationStore::new()
});
