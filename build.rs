//! Link arguments for the appliance image.
//!
//! Only the bare-metal build (`x86_64-unknown-none`) gets the linker script: a static,
//! non-PIE ELF loaded at 1 MiB physical, with 4 KiB maximum page size so the file stays small
//! and every section can get its own page permissions. Host builds (unit tests of the
//! kernel's pure modules) link normally.

use std::env;

fn main() {
    let target = env::var("TARGET").unwrap_or_default();
    let manifest = env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rerun-if-changed=appliance/linker.ld");
    println!("cargo:rerun-if-changed=build.rs");
    if target == "x86_64-unknown-none" {
        println!("cargo:rustc-link-arg-bins=-T{manifest}/appliance/linker.ld");
        println!("cargo:rustc-link-arg-bins=--no-pie");
        println!("cargo:rustc-link-arg-bins=-zmax-page-size=0x1000");
        println!("cargo:rustc-link-arg-bins=--gc-sections");
    }
}
