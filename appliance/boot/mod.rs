//! Getting from the loader to Rust: entry code (target only) and boot-information parsing.

#[cfg(target_os = "none")]
pub mod entry;
pub mod info;
