//! `blkstack bench`: a vhost-user-blk frontend on libblkio for benchmarks.

/// Options of `blkstack bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {}

/// Runs `blkstack bench`.
pub fn main(_args: BenchArgs) -> Result<(), String> {
    Err("bench: not built yet".into())
}
