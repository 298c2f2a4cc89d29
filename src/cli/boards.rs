use super::Global;
use crate::exit::Exit;

#[derive(Debug, clap::Args)]
pub struct BoardsArgs {}

pub fn run(_a: BoardsArgs, _g: &Global) -> anyhow::Result<Exit> {
    super::not_yet("boards")
}
