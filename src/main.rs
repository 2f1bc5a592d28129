//! `qtune`: the command-line front end, one file per command under `cli/`. `train` fine-tunes with a chosen method,
//! `eval` measures a model on a task, `generate` samples text to eyeball a model, `report` compares finished runs,
//! `bench` runs every method side by side, `plan` predicts a run's memory, `export` converts a model to HF or
//! GGUF. Every error ends the program with one
//! line naming the file or option at fault.
mod cli;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "qtune", version, about = "Fine-tune LLaMA-family models with quantized training states")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

// One `Cmd` exists per process, parsed once: boxing `TrainArgs` to even out the variants would save nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Fine-tune a model on a task and report accuracy before/after and memory.
    Train(cli::train::TrainArgs),
    /// Evaluate a model on a task's dev and eval splits.
    Eval(cli::eval::EvalArgs),
    /// Sample a continuation of a prompt.
    Generate(cli::generate::GenArgs),
    /// Compare finished runs: a Markdown table, results.json, and loss/memory plots (SVG and PNG).
    Report(cli::report::ReportArgs),
    /// Run every method with the same settings, each in its own process, and report them side by side.
    Bench(cli::bench::BenchArgs),
    /// Convert a model (HF directory, GGUF file, or a run's model/) to an HF checkpoint (f32/bf16/f16, sharded) or
    /// a GGUF file (f16, q8_0, q4_k), one tensor at a time.
    Export(cli::export::ExportCmd),
    /// Write a randomly initialised model of a config (LLaMA-2-7B's, ...), one tensor at a time.
    Init(cli::init::InitArgs),
    /// Predict a method's memory (breakdown and peak) for a model config, batch and sequence length, without
    /// loading any weight.
    Plan(cli::plan::PlanArgs),
}

/// Parses a command line and refuses a method option the chosen method would not read (clap's own record of what
/// the line gave, checked against [`qtune::methods::MethodKind::reads`]).
fn parse<I, T>(argv: I) -> std::result::Result<Cli, cli::ParseError>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let matches = Cli::command().try_get_matches_from(argv)?;
    let mut cli = Cli::from_arg_matches(&matches)?;
    if let Some((_, sub)) = matches.subcommand() {
        match &mut cli.cmd {
            Cmd::Train(a) => a.check_options(sub)?,
            Cmd::Plan(a) => a.check_options(sub)?,
            _ => {}
        }
    }
    Ok(cli)
}

fn main() {
    // Before anything else: MPI's world (when mpirun started this process) sets each rank's share of the cores.
    // Held to the end of main: dropping it finalises MPI.
    let _guard = qtune::dist::init().unwrap_or_else(|e| {
        eprintln!("error: {e}");
        std::process::exit(1);
    });
    let cli = parse(std::env::args_os()).unwrap_or_else(|e| e.exit());
    let r = match cli.cmd {
        Cmd::Train(a) => cli::train::run(a),
        Cmd::Eval(a) => cli::eval::run(a),
        Cmd::Generate(a) => cli::generate::run(a),
        Cmd::Report(a) => cli::report::run(a),
        Cmd::Bench(a) => cli::bench::run(a, |argv| parse(argv).map(|_| ())),
        Cmd::Plan(a) => cli::plan::run(a),
        Cmd::Export(a) => cli::export::run(a),
        Cmd::Init(a) => cli::init::run(a),
    };
    if let Err(e) = r {
        let w = qtune::dist::world();
        if let qtune::Error::Interrupted(_) = e {
            // Every rank stopped at the same step: no rank waits for another, so MPI finalises as usual.
            if w.rank() == 0 {
                eprintln!("error: {e}");
            }
            // Finalises MPI before the exit (in a build without MPI the guard holds nothing).
            #[allow(clippy::drop_non_drop)]
            drop(_guard);
            std::process::exit(130);
        }
        if w.size() > 1 {
            // The other ranks may be waiting in a collective: end them all (mpirun names this rank).
            eprintln!("error on rank {} of {}: {e}", w.rank(), w.size());
            w.abort(1);
        }
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
