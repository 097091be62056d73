//! `danceba features`

/// Arguments of `danceba features`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`danceba features` is not available in this build yet")
}
