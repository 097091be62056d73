//! `danceba inspect`

/// Arguments of `danceba inspect`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`danceba inspect` is not available in this build yet")
}
