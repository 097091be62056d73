//! `danceba download`

/// Arguments of `danceba download`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`danceba download` is not available in this build yet")
}
