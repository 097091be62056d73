//! The `danceba` command-line tool.

use clap::{Parser, Subcommand};

mod cmd;

/// danceba: turn a song into a 3D dance (DanceBa, ICCV 2025), on your own machine.
#[derive(Parser, Debug)]
#[command(name = "danceba", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate dances from songs (audio files or precomputed features).
    Generate(cmd::generate::Args),
    /// Compute the 438-column music features the model sees, or check a feature file.
    Features(cmd::features::Args),
    /// Re-export or re-render a saved motion (.npy or .json).
    Render(cmd::render::Args),
    /// Download the official checkpoints from Hugging Face and convert them once.
    Download(cmd::download::Args),
    /// Convert official .pt checkpoints to safetensors (f32, f16, bf16).
    Convert(cmd::convert::Args),
    /// Show what a checkpoint holds: kind, architecture, parameters, audit.
    Inspect(cmd::inspect::Args),
    /// Measure speed: generation steps, VQ-VAE decoding, feature extraction.
    Bench(cmd::bench::Args),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // with --json, a failure is one JSON object on stdout too, for the scripts that read it
    let json = match &cli.command {
        Command::Generate(a) => a.json,
        Command::Inspect(a) => a.json,
        Command::Bench(a) => a.json,
        _ => false,
    };
    let result = match cli.command {
        Command::Generate(a) => cmd::generate::run(a),
        Command::Features(a) => cmd::features::run(a),
        Command::Render(a) => cmd::render::run(a),
        Command::Download(a) => cmd::download::run(a),
        Command::Convert(a) => cmd::convert::run(a),
        Command::Inspect(a) => cmd::inspect::run(a),
        Command::Bench(a) => cmd::bench::run(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let message = cmd::error_message(&e);
            eprintln!("error: {message}");
            if json && e.downcast_ref::<cmd::Reported>().is_none() {
                println!("{}", serde_json::json!({ "error": message }));
            }
            std::process::ExitCode::from(1)
        }
    }
}
