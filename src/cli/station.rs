use super::Global;
use crate::exit::Exit;

#[derive(Debug, clap::Args)]
pub struct StationArgs {}

pub fn run(_a: StationArgs, _g: &Global) -> anyhow::Result<Exit> {
    super::not_yet("station")
}
