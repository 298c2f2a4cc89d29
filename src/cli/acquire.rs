use super::Global;
use crate::exit::Exit;

#[derive(Debug, clap::Args)]
pub struct FetchArgs {}

pub fn run_fetch(_a: FetchArgs, _g: &Global) -> anyhow::Result<Exit> {
    super::not_yet("fetch")
}

#[derive(Debug, clap::Args)]
pub struct CacheArgs {}

pub fn run_cache(_a: CacheArgs, _g: &Global) -> anyhow::Result<Exit> {
    super::not_yet("cache")
}

#[derive(Debug, clap::Args)]
pub struct BuildArgs {}

pub fn run_build(_a: BuildArgs, _g: &Global) -> anyhow::Result<Exit> {
    super::not_yet("build")
}
