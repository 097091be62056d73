//! `danceba bench`

/// Arguments of `danceba bench`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`danceba bench` is not available in this build yet")
}
