//! The `blkstack` command: parses its arguments and calls the library.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;

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
    Serve(Box<blkstack::config::serve::ServeArgs>),
    /// Run a vhost-user-blk frontend benchmark against any vhost-user-blk backend
    /// (`blkstack bench --help` for its options).
    ///
    /// The benchmark is the `blkstack-bench` program installed beside this one;
    /// `blkstack bench ARGS` runs `blkstack-bench ARGS`.
    #[command(disable_help_flag = true)]
    Bench {
        /// Arguments of `blkstack-bench`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

/// `blkstack-bench` beside this executable, else the one on `PATH`.
fn bench_program() -> PathBuf {
    let beside = std::env::current_exe()
        .ok()
        .map(|exe| exe.with_file_name("blkstack-bench"))
        .filter(|p| p.is_file());
    beside.unwrap_or_else(|| PathBuf::from("blkstack-bench"))
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => blkstack::daemon::serve(*args),
        Command::Bench { args } => {
            let program = bench_program();
            // exec only returns on failure.
            let err = std::process::Command::new(&program).args(args).exec();
            Err(format!("cannot run {}: {err}", program.display()))
        }
    };
    if let Err(e) = result {
        eprintln!("blkstack: {e}");
        std::process::exit(1);
    }
}
