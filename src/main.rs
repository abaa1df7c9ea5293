//! The `blkstack` command: parses its arguments and calls the library.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "blkstack", version, about = "Userspace block-storage daemon")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve block nodes over vhost-user-blk and NBD (qemu-storage-daemon's command line).
    Serve(blkstack::config::serve::ServeArgs),
    /// Run a vhost-user-blk frontend benchmark against any vhost-user-blk backend.
    Bench(blkstack::bench::BenchArgs),
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => blkstack::daemon::serve(args),
        Command::Bench(args) => blkstack::bench::main(args),
    };
    if let Err(e) = result {
        eprintln!("blkstack: {e}");
        std::process::exit(1);
    }
}
