use super::Global;
use crate::exit::Exit;

#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {}

pub fn run_completions(_a: CompletionsArgs, _g: &Global) -> anyhow::Result<Exit> {
    super::not_yet("completions")
}

#[derive(Debug, clap::Args)]
pub struct ManArgs {}

pub fn run_man(_a: ManArgs, _g: &Global) -> anyhow::Result<Exit> {
    super::not_yet("man")
}

#[derive(Debug, clap::Args)]
pub struct ConfigArgs {}

pub fn run_config(_a: ConfigArgs, _g: &Global) -> anyhow::Result<Exit> {
    super::not_yet("config")
}
