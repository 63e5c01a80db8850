//! `hyperfleet`: the daemon (`serve`), a CLI client for every API operation,
//! key management, `doctor` and `openapi`. A thin layer over the library
//! crates: argument parsing, output formatting and exit codes live here.

mod assets;
mod cli;
mod images;
mod keys;
mod machines;
mod output;
mod progress;
mod quota;
mod serve;
mod snapshots;
mod storage;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = cli::Cli::parse();
    // glibc gives each thread that allocates its own arena (up to 8 per
    // core); under a multi-threaded runtime that mostly inflates RSS. Two
    // arenas are plenty for this workload.
    // SAFETY: mallopt only tunes the allocator; called before any thread
    // is started.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    if !matches!(args.command, cli::Command::Serve(_)) {
        // Client commands behave like other Unix tools when piped into
        // `head`: die quietly on a closed pipe instead of panicking. The
        // daemon keeps Rust's default (SIGPIPE ignored, EPIPE returned).
        // SAFETY: signal(2) with SIG_DFL installs no handler code.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Blocking work is short filesystem and process calls; a small pool
        // keeps thread stacks and allocator arenas (RSS) bounded under load.
        .max_blocking_threads(32)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match args.command {
            cli::Command::Serve(a) => serve::serve(*a, &args.client).await,
            cli::Command::Doctor(a) => serve::doctor(&a.serve, &args.client),
            cli::Command::Openapi => {
                print!("{}", hyperfleet_core::http::openapi::document());
                Ok(())
            }
            cli::Command::Machines(cmd) => machines::run(&args.client, cmd).await,
            cli::Command::Snapshots(cmd) => snapshots::run(&args.client, cmd).await,
            cli::Command::Templates(cmd) => snapshots::templates(&args.client, cmd).await,
            cli::Command::Keys(cmd) => keys::run(&args.client, cmd).await,
            cli::Command::Quota(cmd) => quota::run(&args.client, cmd).await,
            cli::Command::Storage => storage::run(&args.client).await,
            cli::Command::Images(cmd) => images::run(&args.client, cmd).await,
            cli::Command::Assets(cmd) => assets::run(&args.client, cmd),
        }
    });
    // Do not wait for stuck blocking tasks (a hung filesystem call, a
    // connection in a long-poll): the daemon has already said goodbye.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
