//! One module per CLI subcommand. Each defines `Args` (clap) and `run(args) -> anyhow::Result<()>`.
pub mod bench;
pub mod convert;
pub mod download;
pub mod features;
pub mod generate;
pub mod inspect;
pub mod outputs;
pub mod render;
