//! The `ptxgrad` command: train, summary, eval, predict, bench, kernels.
//!
//! All of the command line lives here, none of it in the library: the flags ([`args`]), what
//! each command checks and prints (one module per command), the progress bar ([`progress`]) and
//! the signal handlers that turn Ctrl-C into a clean stop. The library measures and trains; this
//! binary decides what the user sees.

mod args;
mod bench;
mod eval;
mod kernels;
mod plot;
mod progress;
mod report;
mod setup;
mod train;

use clap::Parser;

use args::{Cli, Command};
use ptxgrad::train::Stop;

fn main() {
    let cli = Cli::parse();
    // A closed stdout (`ptxgrad predict --json | head -1`) ends the process quietly, as it ends
    // `cat`: Rust ignores SIGPIPE, so each print would fail with EPIPE and panic instead.
    let always = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    if let Err(e) = signal_hook::flag::register_conditional_default(signal_hook::consts::SIGPIPE, always) {
        eprintln!("warning: a closed standard output will end ptxgrad with an error: {e}");
    }
    // Ctrl-C and SIGTERM stop `train` cleanly (see `train::run`); a second one ends it at once.
    let stop = Stop::default();
    if matches!(cli.command, Command::Train(_)) {
        if let Err(e) = stop_on_signals(&stop) {
            eprintln!("warning: Ctrl-C will not stop training cleanly: {e}");
        }
    }
    let result = match cli.command {
        Command::Train(a) => train::run(a, stop),
        Command::Summary { model, resize } => {
            model.summary(resize.unwrap_or(model.recipe.resolution)).map(|s| print!("{s}")).map_err(Into::into)
        }
        Command::Eval(a) => eval::eval(a),
        Command::Predict { common, count } => eval::predict(common, count),
        Command::Bench(a) => bench::run(&a),
        Command::Kernels { device, json } => kernels::run(&device, json),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        // Ended by a signal: 128 + its number, as a shell reports a process the signal killed.
        let code = match e.downcast_ref::<ptxgrad::Error>() {
            Some(ptxgrad::Error::Interrupted { signal, .. }) => 128 + *signal as i32,
            _ => 1,
        };
        std::process::exit(code);
    }
}

/// SIGINT, SIGTERM and SIGHUP request a stop (the run ends after its step and its save in
/// flight); the second such signal exits at once, with 128 + its number.
fn stop_on_signals(stop: &Stop) -> std::io::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM, SIGHUP] {
        // In this order: a signal that finds `seen` set exits; else it sets it and the request.
        signal_hook::flag::register_conditional_shutdown(signal, 128 + signal, seen.clone())?;
        signal_hook::flag::register(signal, seen.clone())?;
        signal_hook::flag::register_usize(signal, stop.cell(), signal as usize)?;
    }
    Ok(())
}
