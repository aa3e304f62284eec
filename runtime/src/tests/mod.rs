//! Scenario tests: the runtime's primitives under the deterministic simulation and the
//! kernel executor on a fake platform. Unit tests of single types sit in their modules.

mod config_lock;
mod determinism;
mod executor;
mod nic_deadlock;
mod simulation;
mod sync;
mod worker;

use crate::sim::{Config, Simulation};

/// A simulation with the default config and a recorded trace.
fn traced(seed: u64) -> Simulation {
    Simulation::with_config(
        seed,
        Config {
            record_trace: true,
            ..Config::default()
        },
    )
}
