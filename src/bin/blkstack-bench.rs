//! `blkstack-bench`: the benchmark client and `compare`, normally run as
//! `blkstack bench ...` (the daemon binary execs this one, found beside it).
//!
//! It is a program of its own so that the daemon does not carry a
//! vhost-user-blk frontend (libblkio) and the report writer: every page of
//! the daemon's code is part of its resident memory, which the benchmark
//! measures against its peers.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "blkstack bench",
    bin_name = "blkstack bench",
    version,
    about = "Run a vhost-user-blk frontend benchmark against any vhost-user-blk backend"
)]
struct Cli {
    #[command(flatten)]
    args: blkstack::bench::BenchArgs,
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    if let Err(e) = blkstack::bench::main(cli.args) {
        eprintln!("blkstack bench: {e}");
        std::process::exit(1);
    }
}
