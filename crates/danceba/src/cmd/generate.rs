//! `danceba generate`

/// Arguments of `danceba generate`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`danceba generate` is not available in this build yet")
}
