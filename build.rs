//! Link-time layout of the daemon's code.
//!
//! `bench/layout/blkstack.order` lists the functions a serving daemon runs
//! (written by `bench/layout/train.sh`). lld's `--symbol-ordering-file`
//! places them first in the code, and so the code that a serving daemon
//! never runs stays out of its resident memory: the kernel maps code in
//! 64 KiB windows around each page that runs, which with the functions in
//! the compiler's order made nearly the whole text resident.
//!
//! The list names mangled symbols; names it has that the binary lacks are
//! skipped (`bench/layout/check.py`, run by `make test`, says when too many
//! are; `make layout` regenerates the list). The order only
//! moves code: it cannot change what the program does.

use std::path::{Path, PathBuf};
use std::process::Command;

const ORDER: &str = "bench/layout/blkstack.order";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={ORDER}");
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let order = manifest.join(ORDER);
    if !order.is_file() {
        println!("cargo:warning={ORDER} is missing: the daemon is linked in the compiler's order");
        return;
    }
    let Some(lld) = lld_flags() else {
        println!("cargo:warning=no lld found: the daemon is linked in the compiler's order");
        return;
    };
    for flag in lld {
        println!("cargo:rustc-link-arg-bin=blkstack={flag}");
    }
    println!(
        "cargo:rustc-link-arg-bin=blkstack=-Wl,--symbol-ordering-file={}",
        order.display()
    );
    println!("cargo:rustc-link-arg-bin=blkstack=-Wl,--no-warn-symbol-ordering");
}

/// The C compiler driver flags that make it link with lld: the rust-lld
/// that rustup ships (the default linker of x86_64-unknown-linux-gnu since
/// Rust 1.90, named explicitly so that the ordering option always reaches an
/// lld), else an `ld.lld` on PATH. None when there is neither.
fn lld_flags() -> Option<Vec<String>> {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let target = std::env::var("TARGET").ok()?;
    let sysroot = Command::new(rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()?;
    let sysroot = String::from_utf8(sysroot.stdout).ok()?;
    let gcc_ld = Path::new(sysroot.trim())
        .join("lib/rustlib")
        .join(target)
        .join("bin/gcc-ld");
    if gcc_ld.join("ld.lld").is_file() {
        return Some(vec![
            format!("-B{}", gcc_ld.display()),
            "-fuse-ld=lld".into(),
        ]);
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("ld.lld").is_file()))
        .unwrap_or(false);
    on_path.then(|| vec!["-fuse-ld=lld".to_string()])
}
