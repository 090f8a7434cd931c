//! The fleet trial: six `fleet-service` processes share a Redis Cluster with replicas while
//! `fleet-trial` drives them through deploys, crashes, failover, slot migration, a write burst
//! and overload, and checks every promise of headroom in every window.
//!
//! Everything talks JSON lines over loopback TCP: the driver to the services, the services to
//! the stand-in database that the driver hosts (the truth about versions and executions).

pub mod db;
pub mod fleet;
pub mod load;
pub mod proto;
pub mod recorder;
pub mod report;
