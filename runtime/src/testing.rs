//! Host-test helpers (`std` feature): run a scenario over many seeds, replay one.
//!
//! ```text
//! cargo test -p hvnet-vmbus hot_plug                      # seeds 0..N
//! HVNET_SEED=1234 HVNET_LOG=trace cargo test -p ... -- --exact tests::hot_plug
//!                                                         # replay one, with every pick
//! HVNET_SEEDS=10000 cargo test -p ... hot_plug            # soak: more seeds
//! ```
//!
//! On failure the panic message names the seed and gives the command that reruns just
//! that seed; since the simulation is deterministic the rerun fails the same way.

use std::boxed::Box;
use std::env;
use std::eprintln;
use std::fmt::Display;
use std::format;
use std::future::Future;
use std::panic::{self, AssertUnwindSafe};
use std::string::{String, ToString};
use std::sync::Once;
use std::vec::Vec;

use crate::handle::Handle;
use crate::sim::{Config, Simulation};

/// Replays exactly this seed when set (decimal or `0x` hex).
pub const SEED_VAR: &str = "HVNET_SEED";
/// Overrides how many seeds a scenario runs (for soaks).
pub const SEEDS_VAR: &str = "HVNET_SEEDS";
/// Log level for the stderr logger of [`init_log`] (`trace` shows every pick).
pub const LOG_VAR: &str = "HVNET_LOG";

fn parse_u64(text: &str) -> Option<u64> {
    let text = text.trim();
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

/// The seeds to run: only `HVNET_SEED` if set, else `0..HVNET_SEEDS` if set, else
/// `0..default_count`.
pub fn seeds(default_count: u64) -> Vec<u64> {
    if let Ok(seed) = env::var(SEED_VAR) {
        match parse_u64(&seed) {
            Some(seed) => return std::vec![seed],
            None => panic!("{SEED_VAR}={seed:?} is not a number"),
        }
    }
    let count = match env::var(SEEDS_VAR) {
        Ok(count) => {
            parse_u64(&count).unwrap_or_else(|| panic!("{SEEDS_VAR}={count:?} is not a number"))
        }
        Err(_) => default_count,
    };
    (0..count).collect()
}

/// The command that reruns the current test with `seed`.
pub fn rerun_command(seed: u64) -> String {
    let package = env::var("CARGO_PKG_NAME").unwrap_or_else(|_| String::from("<package>"));
    let test = std::thread::current()
        .name()
        .filter(|name| *name != "main")
        .map(|name| format!(" -- --exact {name}"))
        .unwrap_or_default();
    format!("{SEED_VAR}={seed} {LOG_VAR}=trace cargo test -p {package}{test}")
}

/// Runs `scenario` for every seed of [`seeds`]`(default_count)`. On the first failure
/// (an `Err` or a panic) panics with the seed, the error and the rerun command.
#[track_caller]
pub fn check_seeds<E: Display>(default_count: u64, mut scenario: impl FnMut(u64) -> Result<(), E>) {
    init_log();
    let caller = panic::Location::caller();
    for seed in seeds(default_count) {
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| scenario(seed)));
        let failure = match outcome {
            Ok(Ok(())) => continue,
            Ok(Err(error)) => error.to_string(),
            Err(payload) => panic_message(&payload),
        };
        panic!(
            "scenario at {caller} failed with seed {seed}:\n{failure}\n\
             rerun this seed with:\n  {}",
            rerun_command(seed)
        );
    }
}

/// Runs a fresh [`Simulation`] per seed with `config`, the future built by `scenario`
/// from its handle as the main task; fails as [`check_seeds`] does.
#[track_caller]
pub fn check_sim<F, Fut>(default_count: u64, config: Config, mut scenario: F)
where
    F: FnMut(Handle) -> Fut,
    Fut: Future<Output = ()> + 'static,
{
    check_seeds(default_count, |seed| {
        let sim = Simulation::with_config(seed, config.clone());
        sim.run(scenario(sim.handle()))
    });
}

fn panic_message(payload: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        format!("panicked: {text}")
    } else if let Some(text) = payload.downcast_ref::<String>() {
        format!("panicked: {text}")
    } else {
        String::from("panicked")
    }
}

struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            // eprintln! output is captured per test by the harness and shown on failure.
            eprintln!(
                "{:5} {}: {}",
                record.level(),
                record.target(),
                record.args()
            );
        }
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

/// Installs a stderr logger at the level named by `HVNET_LOG` (if set and no other
/// logger is installed). Called by [`check_seeds`]; harmless to call again.
pub fn init_log() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let Ok(level) = env::var(LOG_VAR) else {
            return;
        };
        let Ok(level) = level.parse::<log::LevelFilter>() else {
            eprintln!("{LOG_VAR}={level:?} is not a log level (error, warn, info, debug, trace)");
            return;
        };
        if log::set_logger(&LOGGER).is_ok() {
            log::set_max_level(level);
        }
    });
}
