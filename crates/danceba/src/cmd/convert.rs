//! `danceba convert`

/// Arguments of `danceba convert`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`danceba convert` is not available in this build yet")
}
