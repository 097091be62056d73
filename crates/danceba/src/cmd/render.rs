//! `danceba render`

/// Arguments of `danceba render`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`danceba render` is not available in this build yet")
}
